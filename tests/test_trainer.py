"""The training loop's parts on their own (issue 24 points 3-4): the order in which the
host dispatches steps and reads their metrics, the batch prefetcher, the checkpoint
policy. The loop's end-to-end behaviour (resume, kills, preemption, DiLoCo) is
tests/test_train.py's."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from megamesh.config import preset
from megamesh.settings import apply_overrides
from megamesh.train import loop
from megamesh.train.config import TrainConfig

SMALL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128, "vocab_size": 512}


def small_run(**train):
    cfg = dataclasses.replace(preset("tiny"), **SMALL)
    tc = apply_overrides(TrainConfig(), {"global_batch": 8, "seq_len": 32, "data.tokenizer_vocab": 512,
                                         "schedule.warmup_steps": 2, **train}, "train.")
    return cfg, tc


def test_step_n_plus_1_is_dispatched_before_step_n_is_read(tmp_path, corpus, monkeypatch):
    """Ordinary steps are read one behind; a step that saves (every 4) or ends the run is
    read before the next dispatch. The losses are those of the same run read in lockstep."""
    cfg, tc = small_run(steps=8, **{"checkpoint.every": 4, "eval.every": 100})
    trainer = loop.Trainer(cfg, tc, tmp_path / "run", data_paths=[str(corpus)], progress=False,
                           log=lambda *a: None)
    events = []
    fn = trainer.ts.fn

    def dispatch(state, batch):
        events.append(f"d{len([e for e in events if e[0] == 'd']) + 1}")
        return fn(state, batch)

    trainer.ts = dataclasses.replace(trainer.ts, fn=dispatch)
    read = loop.StepRecords.read

    def reading(self, d):
        events.append(f"r{d.n}")
        return read(self, d)

    monkeypatch.setattr(loop.StepRecords, "read", reading)
    result = trainer.run()
    assert events == ["d1", "d2", "r1", "d3", "r2", "d4", "r3", "r4",
                      "d5", "d6", "r5", "d7", "r6", "d8", "r7", "r8"]
    assert result.final_step == 8 and sorted(result.losses) == list(range(1, 9))
    # the same steps on the same batches, each read before the next: the same losses
    cfg, tc = small_run(steps=8, **{"checkpoint.every": 1, "eval.every": 100})
    lockstep = loop.train(cfg, tc, tmp_path / "lockstep", data_paths=[str(corpus)], progress=False,
                          log=lambda *a: None)
    assert lockstep.losses == result.losses


class _Rows:
    def __init__(self, fail_at=None):
        self.fail_at, self.calls = fail_at, []

    def __getitem__(self, step):
        self.calls.append(step)
        if step == self.fail_at:
            raise OSError(f"bad block at step {step}")
        return np.full((8, 4), step, dtype=np.int32)


def test_prefetcher_builds_ahead_in_order_and_a_bad_batch_fails_its_own_step():
    from megamesh.sharding.mesh import make_mesh

    sharding = jax.sharding.NamedSharding(make_mesh(), jax.sharding.PartitionSpec("fsdp"))
    rows = _Rows(fail_at=5)
    p = loop.Prefetcher(rows, sharding, start=3, stop=7, depth=2)
    try:
        batch, _ = p.get(3)
        assert int(batch[0, 0]) == 3 and batch.sharding == sharding
        assert sorted(p.futures) == [4, 5]  # two steps ahead, not past the run's end
        assert int(p.get(4)[0][0, 0]) == 4
        with pytest.raises(OSError, match="bad block at step 5"):
            p.get(5)
        assert int(p.get(6)[0][-1, -1]) == 6
        assert p.futures == {} and p.next == 7
    finally:
        p.close()
    assert rows.calls == [3, 4, 5, 6]


class _Saves:
    every = 3

    def __init__(self):
        self.saved = []

    def save(self, n, state, meta=None, *, wait=False):
        self.saved.append((n, wait, "data_step" in (meta or {})))
        return 0.0


def test_checkpoint_policy():
    ckpt, ram = _Saves(), _Saves()
    _, tc = small_run(steps=20, **{"checkpoint.every": 4})
    policy = loop.CheckpointPolicy(tc, ckpt, ram, {"model": {}})
    assert [n for n in range(1, 13) if policy.needs_state(n)] == [3, 4, 6, 8, 9, 12]
    for n in range(1, 10):
        policy.after_step(n, None, finite=n != 8, done=False, stop=False)
    assert ckpt.saved == [(4, False, True)]  # step 8 was non-finite: no save in the streak
    assert [n for n, *_ in ram.saved] == [3, 6, 9]
    policy.after_step(10, None, finite=True, done=False, stop=True)  # a stop: both tiers, waited
    policy.after_step(20, None, finite=False, done=True, stop=False)  # the end: always, waited
    assert ckpt.saved[1:] == [(10, True, True), (20, True, True)] and ram.saved[-1][0] == 10

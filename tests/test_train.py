"""megamesh train end to end: real subprocesses, real Orbax checkpoints, SIGKILL and SIGTERM."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import MEGAMESH, SIGNALLED, cli_env, hold_free_port, run_cli, run_main, signal_at
from megamesh.cli import main
from megamesh.train.loop import TrainingDiverged

SMALL = ["--model.d_model=64", "--model.n_layers=2", "--model.n_heads=4", "--model.n_kv_heads=2",
         "--model.d_ff=128", "--model.vocab_size=512", "--train.data.tokenizer_vocab=512",
         "--batch", "8", "--seq", "32", "--no-progress", "--train.log_every=1"]


def train_args(out, corpus, *extra):
    return ["train", "--out", str(out), "--data", str(corpus), *SMALL, *extra]


def train_cmd(out, corpus, *extra, signalled=False):
    """The `megamesh train` command line; `signalled`: run by the SIGNALLED launcher (a
    signal at the step its environment's `signal_at` names)."""
    return [*(SIGNALLED if signalled else MEGAMESH), *train_args(out, corpus, *extra)]


def run_train(out, corpus, *extra, devices=8, timeout=240):
    return run_cli(*train_args(out, corpus, *extra), devices=devices, timeout=timeout)


def losses(out):
    """Last recorded loss of every step (a resumed run re-records the redone steps)."""
    by_step = {}
    for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        by_step[rec["step"]] = rec["loss"]
    return by_step


def records(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("ref") / "run"
    r = run_train(out, corpus, "--steps", "12", "--train.checkpoint.every=3")
    assert r.returncode == 0, r.stderr
    return out


def test_run_writes_metrics_tensorboard_tokenizer_and_checkpoints(reference):
    recs = records(reference)
    assert [r["step"] for r in recs] == list(range(1, 13))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu", "goodput",
                "badput_compile_s", "badput_data_s", "badput_checkpoint_s", "badput_lost_s"):
        assert key in recs[-1], key
    assert recs[0]["compile_step"] and recs[0]["badput_compile_s"] > 0
    assert 0 < recs[-1]["goodput"] < 1 and 0 < recs[-1]["mfu"] < 1
    assert "val_loss" in recs[-1] and np.isfinite(recs[-1]["val_loss"])
    assert recs[-1]["loss"] < recs[0]["loss"]  # it learns
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
    assert (reference / "tokenizer.json").exists()
    steps = sorted(int(p.name) for p in (reference / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [6, 9, 12]  # keep-last-3


def _largest_file(step_dir):
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(d):
    f = _largest_file(d)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_bytes(d):
    f = _largest_file(d)
    data = bytearray(f.read_bytes())
    for i in range(16):
        data[len(data) // 2 + i] ^= 0xFF
    f.write_bytes(bytes(data))


def _garbage(d):
    (d / "state" / "_METADATA").write_bytes(b"\x00garbage" * 100)


CORRUPTIONS = {
    "truncated": _truncate,
    "meta deleted": lambda d: shutil.rmtree(d / "meta"),
    "state/_METADATA deleted": lambda d: (d / "state" / "_METADATA").unlink(),
    "bytes flipped": _flip_bytes,
    "garbage": _garbage,
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_a_corrupted_checkpoint_is_skipped_for_the_newest_good_one(tmp_path, corpus, reference, how):
    """Each corruption of the newest checkpoint: one line names it and why, and the run
    resumes from the one before (in process)."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    CORRUPTIONS[how](out / "checkpoints" / "12")
    r = run_main(*train_args(out, corpus, "--steps", "13", "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    skipped = [x for x in r.stderr.splitlines() if x.startswith("skipping checkpoint")]
    assert len(skipped) == 1 and str(out / "checkpoints" / "12") in skipped[0], r.stderr
    assert "resumed from step 9" in r.stdout and "Traceback" not in r.stderr
    assert losses(out)[10] == losses(reference)[10]  # the same run, continued from step 9


def test_rotation_never_deletes_the_newest_good_checkpoint(tmp_path, reference):
    from megamesh.train.checkpoint import Checkpointer

    d = tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints", d)
    for step in ("12", "9"):
        _truncate(d / step)
    ckpt = Checkpointer(d, keep=1, use_async=False, log=lambda m: None)
    ckpt._rotate()  # the two newest are damaged: 6 is the newest good one, and stays
    assert sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) == [6, 9, 12]
    shutil.rmtree(d)
    shutil.copytree(reference / "checkpoints", d)
    ckpt = Checkpointer(d, keep=1, use_async=False, log=lambda m: None)
    ckpt._rotate()  # all good: only the newest is kept
    assert sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) == [12]
    ckpt.close()


def test_no_good_checkpoint_is_one_line_and_a_failure(tmp_path, corpus, reference):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for step in ("6", "9", "12"):
        _truncate(out / "checkpoints" / step)
    r = run_main(*train_args(out, corpus, "--steps", "13", "--resume"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 4 and all(x.startswith("skipping checkpoint") for x in lines[:3])
    assert lines[-1].startswith("megamesh train: error: no good checkpoint in")


def test_unwritable_out_is_one_line_before_any_data_work(tmp_path, corpus):
    if not Path("/sys").is_dir():
        pytest.skip("needs /sys (a read-only file system even for root)")
    r = run_main(*train_args("/sys/megamesh-out", corpus, "--steps", "2"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "megamesh train: error: --out '/sys/megamesh-out' cannot be written: Operation not permitted"]
    assert "data:" not in r.stdout  # nothing tokenized


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("three") / "run"
    r = run_main(*train_args(out, corpus, "--steps", "3", "--train.checkpoint.every=3"))
    assert r.returncode == 0, r.stderr
    return out


LIMITED = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))
sys.argv = ["megamesh", *sys.argv[1:]]
runpy.run_module("megamesh.cli", run_name="__main__")
"""


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE and SIGXFSZ")
@pytest.mark.parametrize("async_save", ["true", "false"])
def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_good_one(tmp_path, corpus, three_steps,
                                                                      async_save):
    """A file-size limit (as a full disk does) makes the save at step 6 fail: exit 1 with
    one line naming the checkpoint and the OS error (a synchronous save within step 6,
    an async one at whichever later step its background write's failure surfaces: that
    depends on scheduling, so any of the run's checkpoints may be named, and Orbax may
    report the error again at every later wait: still one line); checkpoint 3 stays good."""
    import re

    from megamesh.train.checkpoint import verify

    out = tmp_path / "run"
    shutil.copytree(three_steps, out)
    args = train_args(out, corpus, "--steps", "9", "--train.checkpoint.every=3", "--resume",
                      f"--train.checkpoint.async_save={async_save}")
    proc = subprocess.run([sys.executable, "-c", LIMITED, *args], env=cli_env(1),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    step = "6" if async_save == "false" else r"(6|9)"
    assert re.match(rf"megamesh train: error: saving checkpoint {re.escape(str(out / 'checkpoints'))}/"
                    rf"{step} failed: File too large", lines[0]), lines[0]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    if async_save == "false":
        assert last == 5  # step 6 failed in its own save: not recorded as done
    assert verify(out / "checkpoints" / "3") is None
    assert (out / "orbax.log").exists()  # Orbax's own report of it, for whoever wants it


def test_other_data_on_resume_is_refused_unless_asked_for(tmp_path, corpus, reference):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    other = tmp_path / "other"
    other.mkdir()
    for f in sorted(corpus.iterdir())[:6]:  # half the documents: another corpus
        shutil.copy(f, other / f.name)
    r = run_main(*train_args(out, other, "--steps", "13", "--resume"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--data is not the corpus this run was trained on" in r.stderr and "--new-data" in r.stderr
    r = run_main(*train_args(out, corpus, "--steps", "13", "--resume"))  # the same data: fine
    assert r.returncode == 0, r.stderr
    r = run_main(*train_args(out, other, "--steps", "14", "--resume", "--new-data"))
    assert r.returncode == 0, r.stderr
    assert "replacing the corpus this run trained on so far" in r.stdout
    assert "resumed from step 13" in r.stdout
    meta = json.loads((out / "data" / "corpus.json").read_text())
    assert len(meta["history"]) == 1 and str(corpus) in meta["history"][0]["description"]
    assert str(other) in meta["description"]


def test_a_failed_first_attempt_does_not_stick_to_out(tmp_path, corpus):
    small = tmp_path / "small"
    small.mkdir()
    for i in range(60):
        (small / f"{i}.txt").write_text(f"def f{i}(x):\n    return x + {i}\n")
    out = tmp_path / "run"
    r = run_main(*train_args(out, small, "--steps", "2", "--seq", "256"))
    assert r.returncode == 2 and "split has" in r.stderr and "fewer than one sequence" in r.stderr
    assert not (out / "data").exists() and not (out / "tokenizer.json").exists()
    r = run_main(*train_args(out, corpus, "--steps", "2"))  # corrected: works
    assert r.returncode == 0, r.stderr


def test_damaged_corpus_and_bad_documents_are_errors_not_training_data(tmp_path, corpus, reference):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    data = bytearray((out / "data" / "train.npy").read_bytes())
    for i in range(16):
        data[-100 + i] ^= 0xFF
    (out / "data" / "train.npy").write_bytes(bytes(data))
    r = run_main(*train_args(out, corpus, "--steps", "13", "--resume"))
    assert r.returncode == 2 and "train.npy does not match its checksum" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.jsonl").write_text('{"text": "fine"}\n{"text": null}\n')
    r = run_main(*train_args(tmp_path / "j", docs, "--steps", "2"))
    assert r.returncode == 2 and "a.jsonl:2: 'text' must be a string, not null" in r.stderr

    from megamesh.train.data import read_documents

    mixed = tmp_path / "mixed"
    shutil.copytree(corpus, mixed)
    (mixed / "blob.txt").write_bytes(bytes(range(256)) * 40)
    texts, desc = read_documents([str(mixed)])
    assert len(texts) == len(list(corpus.iterdir())) and "1 binary file(s) skipped" in desc


def test_sigkill_then_resume_gives_bit_identical_losses(tmp_path, corpus, reference):
    out = tmp_path / "run"
    # SIGKILL at step 8, before its record: steps 1-7 recorded, checkpoint 6 committed or
    # not (its save is asynchronous): the resume starts from 6 or 3 and redoes step 7
    proc = subprocess.Popen(train_cmd(out, corpus, "--steps", "12", "--train.checkpoint.every=3",
                                      signalled=True),
                            env=cli_env(8, **signal_at("KILL", 8)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    assert proc.wait(timeout=240) == -signal.SIGKILL
    assert max(losses(out)) == 7
    r = run_train(out, corpus, "--steps", "12", "--train.checkpoint.every=3", "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed from step" in r.stdout
    assert losses(out) == losses(reference)  # exact float equality, step for step
    assert records(out)[-1]["badput_lost_s"] > 0


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path, corpus, reference):
    out = tmp_path / "run"
    # SIGTERM during step 2: the run stops after step 3, the first step that reads the flag
    proc = subprocess.Popen(train_cmd(out, corpus, "--steps", "12", "--train.checkpoint.every=100",
                                      signalled=True),
                            env=cli_env(8, **signal_at("TERM", 2)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 143, stderr[-3000:]
    entries = sorted(p.name for p in (out / "checkpoints").iterdir())
    saved = [int(n) for n in entries if n.isdigit()]
    assert saved == [3] and f"after step {saved[0]}" in stdout, (
        f"checkpoints/: {entries}; stdout: {stdout[-2000:]}; stderr: {stderr[-3000:]}")
    r = run_train(out, corpus, "--steps", "12", "--train.checkpoint.every=100", "--resume")
    assert r.returncode == 0, r.stderr
    assert losses(out) == losses(reference)


@pytest.mark.slow  # the default suite resumes onto another mesh and device count with
# pipeline stages (test_resume_across_a_change_of_pipeline_stages)
def test_resume_onto_a_different_mesh_and_device_count(tmp_path, corpus, reference):
    out = tmp_path / "run"
    r = run_train(out, corpus, "--steps", "6", "--train.checkpoint.every=3", "--mesh", "fsdp=8")
    assert r.returncode == 0, r.stderr
    r = run_train(out, corpus, "--steps", "12", "--train.checkpoint.every=3", "--resume",
                  "--mesh", "data=2,tensor=2", devices=4)
    assert r.returncode == 0, r.stderr
    assert "onto mesh data=2,tensor=2" in r.stdout
    ref, got = losses(reference), losses(out)
    # The schedule differs (6 vs 12 steps) for steps 1-6, so compare where the runs agree:
    # step 7 from the resharded restore equals a same-mesh resume from the same checkpoint.
    same_mesh = tmp_path / "same"
    shutil.copytree(out, same_mesh, ignore=shutil.ignore_patterns("metrics.jsonl"))
    for p in (same_mesh / "checkpoints").iterdir():
        if p.name.isdigit() and int(p.name) > 6:
            shutil.rmtree(p)
    r = run_train(same_mesh, corpus, "--steps", "12", "--train.checkpoint.every=3", "--resume",
                  "--mesh", "fsdp=8")
    assert r.returncode == 0, r.stderr
    again = losses(same_mesh)
    for step in range(7, 13):
        assert got[step] == pytest.approx(again[step], rel=1e-5)
    assert set(ref) == set(got)


def test_non_finite_steps_are_skipped_then_stop_training(tmp_path, corpus, nan_at_steps, capsys):
    """In process (the guard's fault is injected by a fixture, not a product flag)."""
    out = tmp_path / "skip"
    nan_at_steps(2)
    assert main(train_args(out, corpus, "--steps", "6")) == 0
    recs = records(out)
    assert [x["finite"] for x in recs] == [True, True, False, True, True, True]
    assert [x["skipped_steps"] for x in recs] == [0, 0, 1, 1, 1, 1]
    assert "1 non-finite step(s) skipped" in capsys.readouterr().out

    out = tmp_path / "stop"
    nan_at_steps(4, 5, 6)
    assert main(train_args(out, corpus, "--steps", "12", "--train.checkpoint.every=2",
                           "--train.max_bad_steps=3")) == TrainingDiverged.exit_code == 3
    err = capsys.readouterr().err
    assert "3 consecutive steps had a non-finite loss" in err and "Traceback" not in err
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == 4  # the last good one (steps 5-7 were bad), intact and restorable
    assert f"the last good checkpoint, {out / 'checkpoints' / '4'}, is intact" in err


@pytest.mark.slow
def test_a_run_stopped_for_non_finite_steps_resumes_from_the_last_good_checkpoint(
        tmp_path, corpus, nan_at_steps, capsys):
    """The stop of the test above, then a resume in a fresh process (the suite's time:
    slow; resume from a checkpoint runs in the default suite elsewhere)."""
    out = tmp_path / "stop"
    nan_at_steps(4, 5, 6)
    assert main(train_args(out, corpus, "--steps", "12", "--train.checkpoint.every=2",
                           "--train.max_bad_steps=3")) == TrainingDiverged.exit_code
    capsys.readouterr()
    r = run_train(out, corpus, "--steps", "8", "--train.checkpoint.every=2", "--resume")
    assert r.returncode == 0, r.stderr


def test_guard_also_rejects_a_non_finite_update():
    """A finite loss and gradient whose update leaves a non-finite optimizer moment: the
    step changes nothing and is counted, so the state (and every checkpoint) stays finite."""
    import jax
    import jax.numpy as jnp

    from megamesh.config import preset
    from megamesh.sharding.mesh import make_mesh
    from megamesh.train.config import ScheduleConfig, TrainConfig
    from megamesh.train.step import build_train_step

    cfg = preset("tiny").replace(n_layers=1, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128,
                                 vocab_size=512)
    tc = TrainConfig(steps=4, global_batch=2, seq_len=16, schedule=ScheduleConfig(warmup_steps=1))
    ts = build_train_step(cfg, tc, make_mesh("fsdp=1", jax.devices()[:1]))
    state = ts.init(jax.random.key(0))
    batch = jnp.zeros((2, 17), jnp.int32)
    mu = state["opt_state"][1][0].mu  # clip, then AdamW's (ScaleByAdamState, ...)
    bad_mu = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.inf), mu)
    state["opt_state"] = (state["opt_state"][0],
                          (state["opt_state"][1][0]._replace(mu=bad_mu), *state["opt_state"][1][1:]))
    before = jax.tree.map(lambda x: x.copy(), state["params"])
    state, m = ts.fn(state, batch)
    assert bool(jnp.isfinite(m["loss"])) and bool(jnp.isfinite(m["grad_norm"]))
    assert not bool(m["finite"]) and int(m["skipped"]) == 1
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(before)):
        assert bool(jnp.all(a == b))


def test_train_runs_the_run_spec_of_a_plan(tmp_path, corpus, capsys):
    """plan --json -> train --plan: the plan's layout, remat, microbatches, sequence length
    and batch are what the run uses (in process)."""
    assert main(["plan", "--model", "tiny", "--target", "v5p:8", "--batch", "8", "--seq", "32",
                 "--json"]) == 0
    plan = tmp_path / "plan.json"
    plan.write_text(capsys.readouterr().out)
    run = json.loads(plan.read_text())["run"]
    out = tmp_path / "run"
    model = [a for a in SMALL if a.startswith("--model.")]
    assert main(["train", "--plan", str(plan), "--out", str(out), "--data", str(corpus), "--steps", "2",
                 "--no-progress", "--train.data.tokenizer_vocab=512", *model]) == 0
    log = capsys.readouterr().out
    spec = run["spec"]
    assert f"mesh {spec['layout']}," in log and f"remat {spec['remat']};" in log
    assert f"batch {run['global_batch']}x{run['seq_len']}" in log


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/nonexistent/path"], "does not exist"),
        (["--mesh", "data=3"], "uses 3 devices but there are 8"),
        (["--batch", "6"], "not divisible by the data-parallel size 8"),
        (["--seq", "99999"], "longer than model tiny allows"),
        (["--train.learning_rate=1"], "unknown override key 'train.learning_rate'"),
        (["--train.lr=1e-3"], "did you mean train.optimizer.lr?"),
        (["--train.optimizer.eps=-1"], "train.optimizer.eps=-1.0 is not allowed: must be > 0"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, corpus, args, message):
    out = tmp_path / "bad"
    r = run_main(*train_args(out, corpus, "--steps", "2", *args))  # in process: no jax start-up
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_empty_data_and_existing_run_and_other_model(tmp_path, corpus, reference):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("  \n")
    r = run_main(*train_args(tmp_path / "e", empty, "--steps", "2"))
    assert r.returncode == 2 and "holds no text" in r.stderr

    before = (reference / "metrics.jsonl").read_bytes()
    r = run_main(*train_args(reference, corpus, "--steps", "2"))
    assert r.returncode == 2 and "already holds checkpoints" in r.stderr
    r = run_main(*train_args(reference, corpus, "--steps", "14", "--resume", "--model.n_layers=3"))
    assert r.returncode == 2 and "different model: n_layers=2 there, 3 asked for" in r.stderr
    assert (reference / "metrics.jsonl").read_bytes() == before  # nothing overwritten


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, corpus, two_hosts, held_port):
    """2 processes x 1 CPU device over gloo == 1 process x 2 devices, same global layout.
    Slow (the default suite's two-process training runs in the lost-host test, which
    resumes a process bit for bit from its peer)."""
    single = tmp_path / "single"
    r = run_train(single, corpus, *TWO_HOSTS_ARGS, "--mesh", "dcn=2", devices=2)
    assert r.returncode == 0, r.stderr
    assert "on 2 cpu devices" in (two_hosts / "stdout-0.txt").read_text()
    a, b = losses(single), losses(two_hosts)
    assert a.keys() == b.keys()
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-6, abs=0)

    # Preemption of one host: SIGTERM to process 1 only. Both processes agree to stop after
    # the same step, save one checkpoint together and exit 143 (none hangs in a collective).
    multi = tmp_path / "multi"
    shutil.copytree(two_hosts, multi)
    procs = _start_processes(multi, corpus, held_port, 2, "--steps", "60", "--resume",
                             "--train.checkpoint.every=1000", signals={1: signal_at("TERM", 3)})
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [143, 143], [e[-2000:] for _, e in outs]
    saved = sorted(int(n.name) for n in (multi / "checkpoints").iterdir() if n.name.isdigit())
    assert saved == [10, 12, 16]  # resumed at 12; the signal during step 15, read at 16
    assert f"stopped by a signal to another process after step {saved[2]}" in outs[0][0]


def test_train_starts_from_a_hugging_face_directory(tmp_path, corpus):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(hf).save_pretrained(tmp_path / "hf")
    # the model's own tokenizer: no "<|endoftext|>"; its EOS is "</s>", id 2 as the config says
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megamesh.data.tokenizer import tokenizer_sha256
    from megamesh.train.data import read_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(read_documents([str(corpus)])[0], trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    assert hf.eos_token_id == 2 and tok.token_to_id("</s>") == 2 and tok.token_to_id("<|endoftext|>") is None
    out = tmp_path / "run"
    r = run_cli("train", "--out", out, "--data", corpus, "--model", tmp_path / "hf",
                "--batch", "8", "--seq", "32", "--steps", "2", "--no-progress", timeout=240)
    assert r.returncode == 0, r.stderr
    assert "initialized from the model directory's weights" in r.stdout
    assert "hf's tokenizer vocab 500" in r.stdout
    # HF's init (std 0.02) gives near-uniform logits: loss ~ ln(512) = 6.24, unlike megamesh's init
    assert abs(records(out)[0]["loss"] - np.log(512)) < 0.05
    meta = json.loads((out / "data" / "corpus.json").read_text())
    assert meta["eos_id"] == 2 and meta["tokenizer_sha256"] == tokenizer_sha256(tok)
    assert (np.load(out / "data" / "train.npy") == 2).sum() >= 10  # documents end with the model's EOS
    # serving the run stops at the model's EOS; a tokenizer swapped under the run is refused
    import jax

    from megamesh.serve.load import load_model
    from megamesh.sharding.mesh import make_mesh
    from megamesh.sharding.rules import param_shardings, strategy

    mesh = make_mesh({"tensor": 1}, jax.devices()[:1])
    served = load_model(str(out), lambda cfg: param_shardings(cfg, mesh, strategy("serve")), "float32")
    assert served.eos_ids == (2,)
    from tokenizers import normalizers

    tok.normalizer = normalizers.Lowercase()  # another tokenizer, same vocabulary
    tok.save(str(out / "tokenizer.json"))
    r = run_cli("train", "--out", out, "--resume", "--steps", "3", "--no-progress", timeout=240)
    assert r.returncode != 0 and "is not the tokenizer this run's data was cut with" in r.stderr


FAULTS = """
import resource, sys
from megamesh.platform import keep_freed_host_memory
applied = keep_freed_host_memory() if sys.argv[1] == "keep" else False
import jax, jax.numpy as jnp
# a 64 MiB temporary (the matmul's output) inside each run; the result is a scalar
f = jax.jit(lambda a, b: jnp.sum(jnp.tanh(a @ b) @ b.T))
a, b = jnp.ones((2048, 256), jnp.float32), jnp.ones((256, 8192), jnp.float32)
f(a, b).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    f(a, b).block_until_ready()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc settings")
def test_freed_host_memory_is_reused_not_faulted_in_every_step():
    """XLA:CPU's per-run temporaries come back from glibc's heap instead of fresh mmaps: no
    page faults per run once warm (without it, runs fault much of their 64 MiB in again)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    counts = {}
    for mode in ("keep", "system"):
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                             env=env, check=True).stdout.split()
        counts[mode] = (out[0], int(out[1]))
    assert counts["keep"][0] == "True" and counts["system"][0] == "False"
    # several fake CPU devices contend for one arena's lock: left at glibc's defaults
    many = subprocess.run([sys.executable, "-c", "from megamesh.platform import "
                           "keep_freed_host_memory as k; print(k())"], capture_output=True,
                          text=True, check=True,
                          env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert many.stdout.strip() == "False"
    # with it, (almost) no page faults per run once warm. Without it glibc's own choice
    # varies with the machine (its dynamic mmap threshold, transparent huge pages): 8,192+
    # pages per run when the suite was written, 1,289-4,864 on a later machine, so the
    # baseline is reported, not asserted
    pages = 64 * 1024 * 1024 // 4096
    assert counts["keep"][1] < pages // 20, counts


# jax's coordination service ends every process once one misses its heartbeats for this
# long. Where a test waits for the survivors to give up on a killed peer it passes
# GIVE_UP_S: long enough that a starved process on a loaded 2-core machine is not taken
# for dead (4 s was not: one loaded run in three aborted a healthy process), short enough
# to wait for. Elsewhere nobody waits on it, so jax's default.
GIVE_UP_S = 12


def _start_processes(out, corpus, port, n, *extra, heartbeat=100, devices=1, signals=None):
    """`megamesh train` as n localhost processes x `devices` CPU devices (dcn=n: one
    data-parallel replica each); `signals`: process id -> `signal_at(...)` for it;
    `heartbeat`: seconds before the survivors give up on a dead process."""
    procs = []
    for pid in range(n):
        env = cli_env(devices, MEGAMESH_COORDINATOR=f"127.0.0.1:{port}", MEGAMESH_NUM_PROCESSES=str(n),
                      MEGAMESH_PROCESS_ID=str(pid), MEGAMESH_HEARTBEAT_TIMEOUT=str(heartbeat),
                      **(signals or {}).get(pid, {}))
        procs.append(subprocess.Popen(train_cmd(out, corpus, "--mesh", f"dcn={n},fsdp={devices}", *extra,
                                                signalled=bool(signals)),
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def _finish(procs, timeout=300):
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    return [o for o, _ in outs]


TWO_HOSTS_ARGS = ("--steps", "12", "--train.checkpoint.every=5")


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory, corpus):
    """An uninterrupted run as 2 localhost processes x 1 CPU device (dcn=2), 12 steps; each
    process's stdout in stdout-<i>.txt."""
    out = tmp_path_factory.mktemp("two-hosts") / "run"
    with hold_free_port() as port:
        stdout = _finish(_start_processes(out, corpus, port, 2, *TWO_HOSTS_ARGS))
    for i, text in enumerate(stdout):
        (out / f"stdout-{i}.txt").write_text(text)
    return out


def test_a_lost_host_resumes_from_ram_and_a_peer_bit_for_bit(tmp_path, corpus, two_hosts, held_port):
    """Multi-tier checkpoints (issue 17 point 2): 2 processes (one CPU device each), each one
    data-parallel replica.
    Process 1 is SIGKILLed mid-run and its RAM copy wiped (a replaced host); process 0 gives
    up on it (heartbeat); both restart: process 0 restores from its own RAM, process 1 from
    process 0's replica, at a step newer than the persistent checkpoint, and the losses equal
    an uninterrupted run's bit for bit."""
    args, ref = list(TWO_HOSTS_ARGS), two_hosts
    out, ram = tmp_path / "run", tmp_path / "ram"
    tiered = [*args, "--train.checkpoint.ram_every=1", f"--train.checkpoint.ram_dir={ram}"]
    # process 1 dies at step 8 (before process 0 can pass it): RAM copies of step 7
    procs = _start_processes(out, corpus, held_port, 2, *tiered, signals={1: signal_at("KILL", 8)},
                             heartbeat=GIVE_UP_S)
    try:
        rc = procs[1].wait(timeout=240)
        assert rc == -signal.SIGKILL, (rc, procs[1].stderr.read()[-3000:])
    finally:
        procs[0].communicate(timeout=120)  # it gives up on its lost peer by itself
    assert procs[0].returncode != 0
    shutil.rmtree(ram / "process-1")
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [5]

    stdout = _finish(_start_processes(out, corpus, held_port, 2, *tiered, "--resume"))
    step = int(stdout[0].split("restored step ")[1].split()[0])
    assert 5 < step <= 7 and f"resumed from step {step}" in stdout[0]  # RAM copies are async
    assert "from the in-memory checkpoint (this host's RAM)" in stdout[0]
    assert "process 1: restored" in stdout[1] and "a peer's replica" in stdout[1]
    assert losses(out) == losses(ref)  # exact float equality, step for step
    assert not (ram / "process-0").exists()  # a finished run frees its RAM


@pytest.mark.slow  # ~65 s (4 processes, 3 restarts); the default suite keeps the RAM-tier restart
def test_elastic_restart_on_fewer_hosts_and_back(tmp_path, corpus, held_port):
    """Elastic training (issue 17 point 3): 4 hosts (dcn=4, one CPU device each) -> one is
    SIGKILLed and no spare is free: the 3 survivors restart at once from their in-memory
    checkpoints on dcn=3, the same global batch in 2 microbatches (no more sequences per
    device than before) -> the 4th returns: all 4 stop at a step boundary (SIGTERM) and
    restart on dcn=4. Every step is trained once in the final curve, which
    matches an uninterrupted run's within float reordering."""
    args = ["--steps", "10", "--batch", "24", "--train.checkpoint.every=100", "--elastic",
            "--train.checkpoint.ram_every=1", f"--train.checkpoint.ram_dir={tmp_path / 'ram'}"]
    ref = tmp_path / "ref"
    r = run_train(ref, corpus, "--steps", "10", "--batch", "24", "--mesh", "dcn=4", devices=4)
    assert r.returncode == 0, r.stderr

    out = tmp_path / "run"
    procs = _start_processes(out, corpus, held_port, 4, *args, signals={3: signal_at("KILL", 4)},
                             heartbeat=GIVE_UP_S)
    for p in procs:
        p.communicate(timeout=240)
    shutil.rmtree(tmp_path / "ram" / "process-3")  # its host is gone
    killed_at = max(losses(out))

    # preempted: a SIGTERM to process 0 during its 3rd step stops all three after the 4th
    procs = _start_processes(out, corpus, held_port, 3, *args, "--resume",
                             signals={0: signal_at("TERM", 3)})
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [143] * 3, [e[-2000:] for _, e in outs]
    shrunk = outs[0][0]
    step = int(shrunk.split("restored step ")[1].split()[0])
    assert killed_at - 1 <= step <= killed_at  # at most the step in flight is redone
    assert "this host's RAM" in shrunk
    assert "elastic: 3 data-parallel devices, so 2 microbatch(es) of 12 sequences" in shrunk

    grown = _finish(_start_processes(out, corpus, held_port, 4, *args, "--resume"))
    assert "elastic:" not in grown[0] and "on 4 cpu devices" in grown[0]
    got, want = losses(out), losses(ref)
    assert sorted(got) == list(range(1, 11))
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=1e-5), s


def _islands(out, corpus, n, *extra, only=None, signals=None):
    """DiLoCo islands as separate `megamesh train` jobs (1 process x 1 CPU device each);
    `signals`: island -> `signal_at(...)` for it."""
    return {i: subprocess.Popen(train_cmd(out, corpus, "--diloco", f"islands={n},inner_steps=4",
                                          "--island", str(i), *extra, signalled=bool(signals)),
                                env=cli_env(1, **(signals or {}).get(i, {})),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in (range(n) if only is None else only)}


def test_diloco_islands_match_data_parallel_at_equal_tokens(tmp_path, corpus):
    """DiLoCo (issue 17 point 4): 2 islands, each on its half of every global batch, an outer
    Nesterov step every 4 steps, vs one data-parallel job on the whole batch: after the
    same tokens the islands hold identical parameters and their validation loss is no worse
    than data parallel's by more than 2% (here it is better: the outer momentum)."""
    dp = tmp_path / "dp"
    r = run_train(dp, corpus, "--steps", "16", devices=2)
    assert r.returncode == 0, r.stderr
    procs = _islands(tmp_path / "dl", corpus, 2, "--steps", "16")
    outs = {i: p.communicate(timeout=300) for i, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), [e[-2000:] for _, e in outs.values()]
    assert "across the DCN" in outs[0][0]
    dl = [records(tmp_path / "dl" / f"island-{i}") for i in range(2)]
    val = [d[-1]["val_loss"] for d in dl]
    assert val[0] == val[1]  # the last outer step leaves every island the same parameters
    assert val[0] <= records(dp)[-1]["val_loss"] * 1.02
    rounds = [x for x in dl[0] if "diloco_round" in x]
    assert [x["diloco_round"] for x in rounds] == list(range(1, 5))
    assert all(x["islands_reported"] == 2 for x in rounds)


@pytest.mark.slow  # ~48 s; test_diloco_islands_match_data_parallel_at_equal_tokens stays by default
def test_a_failed_island_does_not_stop_the_others(tmp_path, corpus):
    """3 islands, quorum 2 (a majority): island 2 is SIGKILLed at step 6, after round 1;
    after waiting 10 s at each later outer step the other two go on without it and finish;
    restarted, island 2 rejoins at the newest outer state instead of replaying the rounds
    it missed. (Round 1 has 2 or 3 islands: an island more than wait_s late is left out,
    which a loaded machine may do to a live one; the two live islands need only be within
    10 x wait_s of each other, the product's own QuorumLost rule.)"""
    out, args = tmp_path / "dl", ["--steps", "16", "--batch", "12", "--train.diloco.wait_s=10"]
    procs = _islands(out, corpus, 3, *args, signals={2: signal_at("KILL", 6)})  # after round 1
    assert procs[2].wait(timeout=300) == -signal.SIGKILL
    outs = {i: procs[i].communicate(timeout=300) for i in (0, 1)}
    assert procs[0].returncode == 0 and procs[1].returncode == 0, [e[-2000:] for _, e in outs.values()]
    reported = {x["diloco_round"]: x["islands_reported"] for x in records(out / "island-0")
                if "diloco_round" in x}
    assert reported[1] in (2, 3) and reported[2] == reported[3] == reported[4] == 2  # 2 is dead
    again = _islands(out, corpus, 3, *args, "--resume", only=[2])[2]
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr[-2000:]
    assert "the other islands are at round 4: joining there at step 16" in stdout


def test_fp8_run_tracks_bf16_and_resumes_exactly(tmp_path, corpus, reference, capsys):
    """Issue 25 points 3 and 5 in short: a plan made with --precision fp8 runs through
    `train --plan` (no refusal); from the same seed its losses track the bf16 run's
    (XLA:CPU emulates FP8: slower, same numerics) with no non-finite step; its
    checkpoints hold the f32 master weights, and a resume from one continues the run
    exactly (the FP8 step is a pure function of the state, as bf16's is)."""
    assert main(["plan", "--model", "tiny", "--target", "tpu7x:4", "--batch", "8", "--seq", "32",
                 "--precision", "fp8", "--mesh", "fsdp=8", "--json"]) == 0
    plan = tmp_path / "plan.json"
    plan.write_text(capsys.readouterr().out)
    assert json.loads(plan.read_text())["run"]["spec"]["precision"] == "fp8"
    out = tmp_path / "fp8"
    r = run_main(*train_args(out, corpus, "--plan", str(plan), "--steps", "12",
                             "--train.checkpoint.every=3"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "precision=fp8" in r.stdout
    fp8, bf16 = losses(out), losses(reference)
    assert sorted(fp8) == sorted(bf16) and all(np.isfinite(list(fp8.values())))
    assert records(out)[-1]["skipped_steps"] == 0
    for step in fp8:
        assert fp8[step] == pytest.approx(bf16[step], rel=0.02), (step, fp8[step], bf16[step])
    assert fp8 != bf16  # the matmuls did run in FP8
    import jax
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(out / "checkpoints" / "12" / "state")
    assert {str(m.dtype) for m in jax.tree.leaves(meta.item_metadata["params"])} == {"float32"}
    again = tmp_path / "again"
    shutil.copytree(out, again)
    shutil.rmtree(again / "checkpoints" / "12")
    shutil.rmtree(again / "checkpoints" / "9")
    r = run_main(*train_args(again, corpus, "--plan", str(plan), "--steps", "12",
                             "--train.checkpoint.every=3", "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step 6" in r.stdout
    assert losses(again) == fp8  # exact float equality, step for step


def test_resume_across_a_change_of_pipeline_stages(tmp_path, corpus):
    """Issue 26 point 4: a checkpoint written with 2 pipeline stages on 8 devices restores
    onto 4 stages on 4 devices (the layer stacks resharded over the new stage axis, the
    rest onto the smaller mesh) and the run continues as the 2-stage run did: steps 4-6
    within 1e-5 (f32)."""
    four = ["--model.n_layers=4", "--train.checkpoint.every=3", "--steps", "6"]
    out = tmp_path / "two"
    r = run_train(out, corpus, *four, "--mesh", "stage=2,fsdp=4")
    assert r.returncode == 0, r.stderr
    assert "pipeline 2 stages x 2 microbatches" in r.stdout
    moved = tmp_path / "four"
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns("metrics.jsonl", "6"))
    r = run_train(moved, corpus, *four, "--resume", "--mesh", "stage=4", devices=4)
    assert r.returncode == 0, r.stderr
    assert "onto mesh stage=4" in r.stdout and "on 4 cpu devices" in r.stdout
    want, got = losses(out), losses(moved)
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(want[step], abs=1e-5)

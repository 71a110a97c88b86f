"""Data at scale: `megamesh data prepare` shards, streaming reads (local, fsspec URLs,
several processes), mixtures, integrity errors (megamesh/data)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import MEGAMESH, cli_env, hold_free_port, run_main
from megamesh.data.batches import ArrayStore, Batches, PreparedData, Source, mixture_counts, parse_data
from megamesh.data.prepare import prepare
from megamesh.data.shards import DataError, Prepared
from megamesh.data.tokenizer import TokenizerInfo
from megamesh.errors import ConfigError
from megamesh.train.data import build_corpus, read_documents, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(corpus) -> TokenizerInfo:
    docs, _ = read_documents([str(corpus)])
    return TokenizerInfo(train_tokenizer(docs, 600), 0, "test BPE")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("prep") / "ds"
    prepare([str(corpus)], out, tokenizer, shard_tokens=5000, block_tokens=700, workers=1,
            unit_bytes=20_000, val_fraction=0.1, progress=False, log=lambda m: None)
    return out


def test_prepare_writes_the_packed_stream_in_fixed_shards_whatever_the_workers(
        tmp_path, corpus, tokenizer, prepared):
    m = json.loads((prepared / "manifest.json").read_text())
    train = m["splits"]["train"]
    assert len(train["shards"]) > 3 and all(s["tokens"] == 5000 for s in train["shards"][:-1])
    assert m["dtype"] == "uint16" and m["tokenizer"]["eos_id"] == 0
    # the same ids as the in-memory packing of `megamesh train --data` (same tokenizer, same split)
    docs, desc = read_documents([str(corpus)])
    packed = build_corpus(docs, desc, tokenizer.tok, 0.1)
    ds = Prepared(str(prepared))
    np.testing.assert_array_equal(ds.split("train").read(0, train["tokens"]), packed.train)
    np.testing.assert_array_equal(ds.split("val").read(0, m["splits"]["val"]["tokens"]), packed.val)
    starts = ds.split("train").doc_starts(0, train["tokens"])
    assert len(starts) == train["documents"] and starts[0] == 0
    assert (packed.train[starts[1:] - 1] == 0).all()  # each document begins after an EOS
    # two worker processes, other work units: the same dataset, byte for byte
    other = tmp_path / "two"
    prepare([str(corpus)], other, tokenizer, shard_tokens=5000, block_tokens=700, workers=2,
            unit_bytes=9_000, val_fraction=0.1, progress=False, log=lambda m: None)
    assert json.loads((other / "manifest.json").read_text())["fingerprint"] == m["fingerprint"]
    with pytest.raises(ConfigError, match="already holds a prepared dataset"):
        prepare([str(corpus)], other, tokenizer, progress=False)


def test_prepare_reads_jsonl_and_parquet_fields_named_by_flag(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"document {i}: " + "word " * (i % 7 + 1) for i in range(60)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[:30]))
    pq.write_table(pa.table({"body": docs[30:], "id": list(range(30))}), tmp_path / "in" / "b.parquet",
                   row_group_size=7)  # five row groups: five work units
    m = prepare([str(tmp_path / "in")], tmp_path / "ds", tokenizer, text_field="body", unit_bytes=200,
                workers=1, progress=False, log=lambda m: None)
    assert m["sources"]["documents"] == 60
    packed = build_corpus(docs, "", tokenizer.tok, 0.02)
    got = Prepared(str(tmp_path / "ds")).split("train")
    np.testing.assert_array_equal(got.read(0, len(got)), packed.train)
    for field, msg in (("text", "has no 'text' column"),):
        with pytest.raises(ConfigError, match=msg):
            prepare([str(tmp_path / "in" / "b.parquet")], tmp_path / "x", tokenizer, text_field=field,
                    progress=False)
    with pytest.raises(ConfigError, match="has no string field 'text'"):
        prepare([str(tmp_path / "in" / "a.jsonl")], tmp_path / "y", tokenizer, progress=False, workers=1)


# SIGKILL itself halfway through writing the Nth shard file (fault injection from outside)
KILL_MID_SHARD = """
import os, signal, sys, runpy
import megamesh.data.shards as sh
real, n = sh.fsync_write, [0]
def dying(path, write):
    if path.name.endswith(".npy.tmp"):
        n[0] += 1
        if n[0] == int(os.environ["KILL_AT_SHARD"]):
            with open(path, "wb") as f:
                f.write(b"half a shard")
            os.kill(os.getpid(), signal.SIGKILL)
    real(path, write)
sh.fsync_write = dying
sys.argv = ["megamesh", *sys.argv[1:]]
runpy.run_module("megamesh.cli", run_name="__main__")
"""


def test_a_killed_prepare_resumes_at_its_shard_and_never_leaves_half_a_shard(tmp_path, corpus, prepared):
    args = ["data", "prepare", str(corpus), "--tokenizer", str(prepared / "tokenizer.json"),
            "--shard-tokens", "2000", "--unit-mb", "0.01", "--workers", "1", "--val-fraction", "0.1",
            "--out", str(tmp_path / "ds")]
    killed = subprocess.run([sys.executable, "-c", KILL_MID_SHARD, *args], capture_output=True, text=True,
                            env=cli_env(1, KILL_AT_SHARD="9"), timeout=120)
    assert killed.returncode == -9, killed.stderr
    ds = tmp_path / "ds"
    assert not (ds / "manifest.json").exists() and (ds / ".prepare-state.json").exists()
    for f in ds.glob("*.npy"):  # everything under a final name is a whole shard
        assert len(np.load(f)) == 2000
    with pytest.raises(DataError, match="unfinished"):
        Prepared(str(ds))
    other = [a if a != "2000" else "3000" for a in args]  # not this unfinished run's options
    refused = run_main(*other)
    assert refused.returncode != 0 and "unfinished prepare of other inputs or options" in refused.stderr
    resumed = subprocess.run([*MEGAMESH, *args], capture_output=True, text=True, env=cli_env(1), timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at unit" in resumed.stderr
    clean = run_main(*args[:-1], str(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr
    fp = [json.loads((d / "manifest.json").read_text())["fingerprint"] for d in (ds, tmp_path / "clean")]
    assert fp[0] == fp[1]
    assert not list(ds.glob(".*")), "temporary files left behind"


def test_damaged_or_missing_shards_are_one_line_naming_the_file(tmp_path, prepared):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(prepared, ds)
    with open(ds / "train-00002.npy", "r+b") as f:  # flip one id in block 1 of shard 2
        f.seek(128 + 2 * 800)
        b = f.read(1)
        f.seek(128 + 2 * 800)
        f.write(bytes([b[0] ^ 1]))
    reader = Prepared(str(ds)).split("train")
    reader.read(10_000, 10_500)  # block 0 of shard 2 is fine
    with pytest.raises(DataError, match=r"train-00002\.npy: block 1 .* does not match its checksum"):
        reader.read(10_000, 10_900)
    r = run_main("data", "verify", str(ds))
    assert r.returncode == 1 and "train-00002.npy: SHA-256" in r.stderr
    assert run_main("data", "verify", str(prepared)).returncode == 0
    (ds / "train-00001.npy").unlink()
    with pytest.raises(DataError, match=r"train-00001\.npy: the file is missing"):
        Prepared(str(ds)).split("train").read(5000, 5001)
    with pytest.raises(DataError, match="not a prepared dataset"):
        Prepared(str(tmp_path))
    with pytest.raises(DataError, match=r"no installed library reads nosuch:// URLs"):
        Prepared("nosuch://bucket/ds")


def test_training_on_a_damaged_shard_stops_with_one_line(tmp_path, prepared):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(prepared, ds)
    for f in ds.glob("train-*.npy"):  # one flipped id in every 700-id block
        raw = bytearray(f.read_bytes())
        for off in range(128, len(raw), 1400):
            raw[off] ^= 1
        f.write_bytes(bytes(raw))
    r = run_main("train", "--out", tmp_path / "run", "--data", ds, "--steps", "2", "--batch", "8",
                 "--seq", "64", "--no-progress")
    assert r.returncode == 1, r.stderr
    assert "does not match its checksum" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_model_directory_names_its_tokenizer_and_eos(tmp_path, tokenizer):
    from megamesh.data.tokenizer import load_tokenizer_spec, model_tokenizer

    hf = tmp_path / "hf"
    hf.mkdir()
    tokenizer.tok.save(str(hf / "tokenizer.json"))
    (hf / "config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    info = load_tokenizer_spec(str(hf))
    assert info.eos_id == 5 and info.sha256 == tokenizer.sha256
    assert model_tokenizer(str(hf)).eos_id == 5 and model_tokenizer("tiny") is None
    (hf / "config.json").write_text(json.dumps({}))
    (hf / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}}))
    assert load_tokenizer_spec(str(hf)).eos_id == 0
    assert load_tokenizer_spec(str(hf / "tokenizer.json")).eos_id == 0
    with pytest.raises(ConfigError, match="'</s>' is not in the tokenizer's vocabulary"):
        load_tokenizer_spec(str(hf / "tokenizer.json"), eos="</s>")
    with pytest.raises(ConfigError, match="holds no tokenizer.json"):
        load_tokenizer_spec(str(tmp_path))


def _to_memory_fs(local: Path, url: str) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    for f in local.iterdir():
        fs.pipe_file(f"{url.split('://', 1)[1]}/{f.name}", f.read_bytes())


def test_a_url_reads_the_same_ids_through_fsspec_with_retries(prepared):
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    _to_memory_fs(prepared, "memory://bucket/ds")
    local, remote = Prepared(str(prepared)).split("train"), Prepared("memory://bucket/ds").split("train")
    for a, b in ((0, 10), (4990, 5020), (0, len(local)), (12_345, 14_000)):
        np.testing.assert_array_equal(local.read(a, b), remote.read(a, b))
    assert remote.bytes_read > 0

    class Flaky(MemoryFileSystem):  # a bucket whose reads fail now and then, or always
        protocol = "flaky"
        fails = {"n": 0, "every": 3, "always": False}

        @classmethod
        def _strip_protocol(cls, path):
            return MemoryFileSystem._strip_protocol(path.replace("flaky://", "memory://"))

        def cat_file(self, path, start=None, end=None, **kw):
            f = Flaky.fails
            f["n"] += 1
            if f["always"] or f["n"] % f["every"] == 0:
                raise ConnectionError("connection reset by peer")
            return super().cat_file(path, start=start, end=end, **kw)

    fsspec.register_implementation("flaky", Flaky, clobber=True)
    flaky = Prepared("flaky://bucket/ds", backoff_s=0.001).split("train")
    np.testing.assert_array_equal(flaky.read(0, len(local)), local.read(0, len(local)))
    assert Flaky.fails["n"] >= 3  # some reads failed and were retried
    Flaky.fails["always"] = True
    flaky._blocks.clear()
    with pytest.raises(DataError, match=r"flaky://bucket/ds/train-00003\.npy: still failing after 5 "
                                        r"attempts: ConnectionError"):
        flaky.read(15_000, 15_010)
    with pytest.raises(DataError, match=r"'memory://bucket/nothing' holds no manifest.json"):
        Prepared("memory://bucket/nothing")
    with pytest.raises(DataError, match=r"memory://bucket/ds/train-00005\.npy: the file is missing"):
        fsspec.filesystem("memory").rm("/bucket/ds/train-00005.npy")
        Prepared("memory://bucket/ds").split("train").read(25_000, 25_001)


def test_mixture_counts_are_grains_interleave_and_batches_are_pure_functions_of_the_step():
    import grain

    for weights in ([0.7, 0.3], [1, 1, 1], [0.5, 0.2, 0.3], [3, 0.01]):
        parts = [grain.MapDataset.range(10**9).map(lambda i, k=k: k) for k in range(len(weights))]
        mixed = grain.MapDataset.mix(parts, weights)
        for n in (0, 1, 7, 100, 1234):
            got = np.bincount([mixed[i] for i in range(n)], minlength=len(weights))
            assert list(got) == mixture_counts(n, weights), (weights, n)
    a, b = np.arange(10_000, dtype=np.int32), np.arange(10_000, 13_000, dtype=np.int32)
    src = [Source("a", ArrayStore(a), 0.7), Source("b", ArrayStore(b), 0.3)]
    x = Batches(src, 16, 8, seed=3, split="train")
    y = Batches(src, 16, 8, seed=3, split="train")
    for step in (0, 5, 999):
        np.testing.assert_array_equal(x[step], y[step])
    rows = np.concatenate([x.rows(s) for s in range(50)])
    assert np.bincount(rows[:, 0]).tolist() == mixture_counts(400, [0.7, 0.3])
    used = x.consumed(50)
    assert used["a"]["tokens"] == mixture_counts(400, [0.7, 0.3])[0] * 16
    assert used["b"]["epoch"] == mixture_counts(400, [0.7, 0.3])[1] // (2999 // 16)
    assert Batches([src[0]], 16, 8, seed=3, split="train", rows=(2, 4))[7].shape == (4, 17)
    with pytest.raises(ConfigError, match="fewer than one sequence"):
        Batches([Source("c", ArrayStore(a[:10]))], 16, 8, seed=0, split="train")


def test_data_flag_forms_and_their_errors(tmp_path, prepared, corpus):
    p = str(prepared)
    assert parse_data([str(corpus)]) is None and parse_data(None) is None
    assert parse_data([p]) == [(p, 1.0)]
    assert parse_data([f"{p}:0.7,{p}:0.3"]) == [(p, 0.7), (p, 0.3)]
    assert parse_data([f"{p}:2", f"{p}:1"]) == [(p, 2.0), (p, 1.0)]
    assert parse_data(["gs://b/x:0.5", "gs://b/y:0.5"]) == [("gs://b/x", 0.5), ("gs://b/y", 0.5)]
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"sources:\n  - {{path: {p}, weight: 3}}\n  - {{path: {p}, weight: 1}}\n")
    assert parse_data([str(mix)]) == [(p, 3.0), (p, 1.0)]
    for bad, msg in (([f"{p}:0"], "must be positive"), ([f"{p}:-1,{p}:2"], "must be positive"),
                     ([f"{p}:0.5,{corpus}"], "mixes prepared datasets with text"),
                     ([f"{corpus}:0.5"], "go with prepared datasets"),
                     ([f"{p}:0.5,{p}"], "give every source")):
        with pytest.raises(ConfigError, match=msg):
            parse_data(bad)
    both = PreparedData([(p, 0.7), (p, 0.3)])
    assert [s.weight for s in both.sources("train")] == [0.7, 0.3]


READER = """
import json, os, sys
import jax
from megamesh.train.distributed import initialize_from_env
initialize_from_env()
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from megamesh.data.batches import PreparedData, Batches
data = PreparedData([(sys.argv[1], 0.6), (sys.argv[1], 0.4)])
b = Batches(data.sources("train"), 32, 8, seed=5, split="train")
mesh = Mesh(np.array(jax.devices()), ("data",))
sh = NamedSharding(mesh, P("data"))
digests, local = [], []
for step in range(20):
    before = b.tokens_read
    arr = b.array(step, sh)
    local.append(b.tokens_read - before)
    whole = np.asarray(multihost_utils.process_allgather(arr, tiled=True))
    digests.append(whole.tolist())
if jax.process_index() == 0:
    json.dump({"batches": digests}, open(sys.argv[2], "w"))
print(json.dumps({"local_tokens": local}))
"""


def _read_batches(prepared: Path, tmp_path: Path, n: int) -> tuple[list, list]:
    out = tmp_path / f"batches-{n}.json"
    with hold_free_port() as port:
        procs = [subprocess.Popen([sys.executable, "-c", READER, str(prepared), str(out)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=cli_env(8 // n, **({} if n == 1 else {
                                      "MEGAMESH_COORDINATOR": f"127.0.0.1:{port}",
                                      "MEGAMESH_NUM_PROCESSES": str(n), "MEGAMESH_PROCESS_ID": str(i)})))
                 for i in range(n)]
        outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, se) in zip(procs, outs):
        assert p.returncode == 0, se[-2000:]
    return json.loads(out.read_text())["batches"], [json.loads(so.splitlines()[-1])["local_tokens"]
                                                    for so, _ in outs]


def test_one_two_and_four_processes_read_the_same_global_batches_each_its_own_rows(tmp_path, prepared):
    data = PreparedData([(str(prepared), 0.6), (str(prepared), 0.4)])
    want = Batches(data.sources("train"), 32, 8, seed=5, split="train")
    expect = [want[s].tolist() for s in range(20)]
    for n in (1, 2, 4):
        batches, local = _read_batches(prepared, tmp_path, n)
        assert batches == expect, f"{n} process(es) read other batches"
        for per_process in local:  # each process read only its 8/n rows of 33 ids per step
            assert per_process == [8 // n * 33] * 20, (n, per_process)


def test_train_streams_a_mixture_records_each_source_and_resumes_on_it(tmp_path, corpus, prepared, tokenizer):
    from megamesh.train.checkpoint import Checkpointer

    other = tmp_path / "other"  # a second source: two of the files, the same tokenizer
    prepare([str(corpus / "module_00.txt"), str(corpus / "module_01.txt")], other, tokenizer,
            shard_tokens=4000, val_fraction=0.3, workers=1, progress=False, log=lambda m: None)
    out = tmp_path / "run"
    common = ["--batch", "8", "--seq", "64", "--no-progress", "--train.checkpoint.every=2",
              "--train.eval.every=100", "--train.eval.batches=1", "--model.n_layers=1",
              "--model.d_model=64", "--model.n_heads=2", "--model.n_kv_heads=1", "--model.d_ff=128",
              "--model.vocab_size=1024"]
    r = run_main("train", "--out", out, "--data", f"{prepared}:0.75,{other}:0.25", "--steps", "4", *common,
                 "--train.data.document_mask=true")
    assert r.returncode == 0, r.stderr
    assert "streamed" in r.stdout and "attention within documents" in r.stdout
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["data_tokens"] == {"ds": 24 * 64, "other": 8 * 64}  # 32 rows: 24 + 8 (Grain's mix)
    assert recs[-1]["loader_tokens_per_s"] > 0
    ckpt = Checkpointer(out / "checkpoints", keep=10, use_async=False)
    assert ckpt.read_meta(4)["data_consumed"]["other"]["tokens"] == 8 * 64
    ckpt.manager.close()
    # resumed without --data: the recorded mixture, the batches where they left off
    r = run_main("train", "--out", out, "--resume", "--steps", "6", *common)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == 6 and sum(recs[-1]["data_tokens"].values()) == 6 * 8 * 64
    # data cut with another tokenizer: refused in one line, even with --new-data
    docs, _ = read_documents([str(corpus)])
    foreign = tmp_path / "foreign"
    prepare([str(corpus)], foreign, TokenizerInfo(train_tokenizer(docs, 400), 0, "another BPE"),
            val_fraction=0.3, workers=1, progress=False, log=lambda m: None)
    for extra in ([], ["--new-data"]):
        r = run_main("train", "--out", out, "--resume", "--data", foreign, "--steps", "8", *extra, *common)
        assert r.returncode == 1 and "was cut with another tokenizer" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    r = run_main("train", "--out", tmp_path / "small", "--data", prepared, "--steps", "1", *common,
                 "--model.vocab_size=512")
    assert r.returncode != 0 and "more than model" in r.stderr
    r = run_main("train", "--out", tmp_path / "bad", "--data", f"{prepared}:0.5,{other}:0", *common)
    assert r.returncode != 0 and "must be positive" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- document masking


@pytest.mark.parametrize("restart", [False, True])
def test_a_packed_row_with_document_masking_equals_each_document_run_alone(restart):
    """Three documents packed in one row, attention kept within each (segment ids from the
    EOS that ends each one): every token's logits equal those of its document run alone
    (RoPE is relative, so with or without positions restarting per document)."""
    import jax
    import jax.numpy as jnp

    from megamesh.config import apply_overrides, preset
    from megamesh.model.backend import choose_kernels, using_kernels
    from megamesh.model.transformer import forward, init_params
    from megamesh.train.step import document_positions, document_segments

    cfg = apply_overrides(preset("tiny"), {"vocab_size": 64, "n_layers": 2, "d_model": 64,
                                           "compute_dtype": "float32", "param_dtype": "float32"})
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(1)
    eos = 0
    docs = [np.append(rng.integers(1, 64, n), eos) for n in (9, 30, 20)]
    packed = jnp.asarray(np.concatenate(docs))[None]
    seg = document_segments(packed, eos)
    assert seg[0].tolist() == [0] * 10 + [1] * 31 + [2] * 21
    T = packed.shape[1]
    pos = document_positions(seg) if restart else jnp.arange(T)[None]
    with using_kernels(choose_kernels("cpu", "attention=blockwise")):
        got = forward(params, packed, pos, cfg=cfg, segments=seg).logits[0]
        start = 0
        for d in docs:
            alone = forward(params, jnp.asarray(d)[None], jnp.arange(len(d))[None], cfg=cfg).logits[0]
            np.testing.assert_allclose(got[start:start + len(d)], alone, rtol=1e-4, atol=1e-4)
            start += len(d)
        unmasked = forward(params, packed, pos, cfg=cfg).logits[0]
    assert float(jnp.max(jnp.abs(unmasked[10:] - got[10:]))) > 1e-2  # the mask matters
    if restart:
        assert pos[0, :12].tolist() == list(range(10)) + [0, 1]

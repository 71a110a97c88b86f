"""The GPU benchmarks, end to end on CPU with --tiny: what a rare, short GPU loan runs
must not fail there on anything a CPU can catch (issue 24)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _rows(path: Path) -> tuple[dict, list[dict]]:
    lines = [json.loads(ln) for ln in path.read_text().splitlines()]
    return lines[0]["header"], lines[1:]


def test_gpu_train_rows_land_one_by_one_and_a_hung_worker_is_killed(tmp_path):
    out = tmp_path / "train.jsonl"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_train.py"), "--tiny", "--runs", "1",
           "--steps", "3", "--warmup", "1", "--shapes", "64x2",
           "--systems", "megamesh,hf-eager,hf-compile", "--timeout-for", "hf-compile=0.5",
           "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    header, rows = _rows(out)
    assert header["model"]["d_model"] == 256
    by = {row["system"]: row for row in rows}
    assert set(by) == {"megamesh", "hf-eager", "hf-compile"}
    # the step loads none of the packages the GPU image lacks (grain, llguidance, the HTTP
    # layer: workers.NOT_ON_GPU_IMAGE)
    assert by["megamesh"]["imported"] == []
    for name in ("megamesh", "hf-eager"):
        assert len(by[name]["times"]) == 3 and 5.0 < by[name]["loss"] < 9.0, by[name]
    # both see labels over the same tokens: random init, loss near ln(vocab) for both
    assert abs(by["hf-eager"]["loss"] - by["megamesh"]["loss"]) < 1.0
    assert by["hf-compile"]["timed_out"] and "timed out after 0.5 s" in by["hf-compile"]["error"]
    assert "| hf-compile | 64 x 2 | | timed out" in r.stdout
    # the table of a results file, as after a run cut short
    again = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_train.py"), "--table",
                            str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert again.returncode == 0 and "| megamesh | 64 x 2 |" in again.stdout
    # results are never overwritten
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert refused.returncode != 0 and "never overwritten" in refused.stderr
    assert _rows(out)[1] == rows


def _serve_cmd(tmp_path, *extra):
    return [sys.executable, str(ROOT / "bench" / "gpu_serve.py"), "--tiny", "--model-dir",
            str(tmp_path / "model"), "--out", str(tmp_path / "serve.jsonl"), "--slots", "4", *extra]


def _run_serve(tmp_path, modes, systems, *extra, timeout):
    """bench/gpu_serve.py --tiny over 3 requests: (its stdout, the header, the checked rows
    by (mode, system))."""
    r = subprocess.run(_serve_cmd(tmp_path, "--modes", ",".join(modes), "--systems", ",".join(systems),
                                  "--requests", "3", *extra),
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    header, rows = _rows(tmp_path / "serve.jsonl")
    return r.stdout, header, _check_serve_rows(rows, modes, systems)


def _check_serve_rows(rows, modes, systems):
    by = {(r["mode"], r["system"]): r for r in rows}
    assert set(by) == {(m, s) for m in modes for s in systems}
    for (mode, _system), row in by.items():
        if row.get("timed_out"):
            continue
        assert "error" not in row, row
        n = 1 if mode == "batch1" else 3
        assert row["completed"] == n and row["failed"] == 0, row
        assert row["output_tokens_per_s"] > 0 and row["tpot_ms_p50"] > 0 and row["ttft_ms_p50"] > 0
    return by


def test_gpu_serve_rows_and_a_worker_killed_by_its_timeout(tmp_path):
    """The megamesh engine and HF static batching serve the same tiny load; HF's
    continuous batching is killed by its timeout (its first request alone takes ~20 s on
    CPU). The slow tests run the rest: megamesh serve over HTTP, batch 1, hf-cb, Poisson."""
    modes, systems = ("offline",), ("megamesh", "hf-static", "hf-cb")
    stdout, header, by = _run_serve(tmp_path, modes, systems, "--timeout-for", "hf-cb=2", timeout=600)
    assert header["load"]["requests"] == 3 and header["roofline_ms_per_token"] > 0
    assert by[("offline", "hf-cb")]["timed_out"]
    # every system produced exactly the requested output lengths
    assert by[("offline", "megamesh")]["output_tokens"] == by[("offline", "hf-static")]["output_tokens"]
    # the engine loads nothing the GPU image lacks (no HTTP layer, grammar or data libraries)
    assert by[("offline", "megamesh")]["imported"] == []
    assert "| offline | megamesh |" in stdout and "timed out after 2 s" in stdout


@pytest.mark.slow
def test_gpu_serve_over_http_and_at_batch_1(tmp_path):
    modes, systems = ("offline", "batch1"), ("megamesh", "megamesh-http", "hf-static")
    _, _, by = _run_serve(tmp_path, modes, systems, timeout=600)
    assert len({by[("offline", s)]["output_tokens"] for s in systems}) == 1
    assert 0 < by[("batch1", "megamesh")]["roofline_share"]


@pytest.mark.slow
def test_gpu_serve_hf_continuous_batching_and_poisson_arrivals(tmp_path):
    modes, systems = ("offline", "poisson"), ("megamesh", "hf-cb")
    _, _, by = _run_serve(tmp_path, modes, systems, timeout=900)
    rate = by[("poisson", "megamesh")]["rate"]
    assert rate == by[("poisson", "hf-cb")]["rate"]
    assert abs(rate - 0.8 * by[("offline", "megamesh")]["request_throughput"]) < 1e-9

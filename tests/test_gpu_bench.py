"""The GPU benchmarks, end to end on CPU with --tiny: what a rare, short GPU loan runs
must not fail there on anything a CPU can catch (issue 24)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    # the step imports none of the loop's data/checkpoint/grammar libraries (the GPU image
    # has no grain or llguidance)
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

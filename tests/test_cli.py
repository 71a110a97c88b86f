"""The `megamesh` command as a user runs it: real subprocesses, exit codes, one-line errors."""

import json
import os
import subprocess
import sys

import pytest


def megamesh(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "megamesh.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


def test_quickstart_runs_trains_and_samples(tmp_path):
    r = megamesh("quickstart", "--batch", "2", "--seq", "32", "--steps", "3", "--out", str(tmp_path / "qs"))
    assert r.returncode == 0, r.stderr
    assert "llama3.1-405b" in r.stdout and "405.85B" in r.stdout
    assert "forward: logits (2, 32, 8192)" in r.stdout
    diff = float(r.stdout.split("max relative difference from the full forward ")[1].split()[0])
    assert diff < 1e-4
    assert "done: step 3" in r.stdout and "sample (temperature 0.8" in r.stdout
    assert (tmp_path / "qs" / "checkpoints" / "3").is_dir()
    # it ends by serving the checkpoint and asking it one question through the anthropic SDK
    assert "/v1/messages -> msg_" in r.stdout and "out, stop_reason " in r.stdout
    assert "server stopped" in r.stdout


def test_inspect_json_counts():
    r = megamesh("inspect", "--model", "llama3.1-8b", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["params_total"] == 8_030_261_248


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "--model", "gpt-5"], "is not a preset, config file or model directory"),
        (["inspect", "--model", "tiny", "--model.n_layer=3"], "unknown override key 'n_layer'"),
        (["inspect", "--model", "tiny", "--model.n_heads=7"], "n_heads=7 is not allowed"),
        (["inspect", "--model", "tiny", "--bogus"], "unrecognized argument '--bogus'"),
        # checked before any data is prepared (no run directory is made)
        (["train", "--out", "{tmp}/k", "--kernels", "matmul=fp8"], "matmul='fp8' is not allowed"),
        (["train", "--out", "{tmp}/k", "--kernels", "moe=sorted"], "moe='sorted' is not allowed"),
    ],
)
def test_user_mistakes_get_one_clear_line(args, message, tmp_path):
    r = megamesh(*(a.format(tmp=tmp_path) for a in args))
    assert not (tmp_path / "k").exists()
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

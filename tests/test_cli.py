"""The `megamesh` command as a user runs it: exit codes, one-line errors. The quickstart and
one error run as real subprocesses (what a user's shell sees, start-up included); the
other checks call the same `main()` in this process."""

import json

import pytest

from conftest import cli_env, run_cli
from megamesh.cli import main


def test_quickstart_runs_trains_and_samples(tmp_path):
    env = {k: v for k, v in cli_env().items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
    r = run_cli("quickstart", "--batch", "2", "--seq", "32", "--steps", "3", "--out", tmp_path / "qs",
                env=env)
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


def test_inspect_json_counts(capsys):
    assert main(["inspect", "--model", "llama3.1-8b", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
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
def test_user_mistakes_get_one_clear_line(args, message, tmp_path, capsys):
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    assert not (tmp_path / "k").exists()
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_mistake_in_a_real_shell_is_one_line_and_exit_2():
    """As a subprocess: nothing else (start-up warnings, tracebacks) reaches stderr."""
    r = run_cli("train", "--out", "/nonexistent/never", "--kernels", "attention=flash", devices=1)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "megamesh train: error: --kernels attention='flash' is not allowed: one of reference, "
        "blockwise, splash, cudnn, pallas_gpu"]

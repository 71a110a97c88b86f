"""Claude Code against `megamesh serve` (issue 32 point 5): bench/claude_code_e2e.py installs
the pinned Claude Code from npm, points it at a server on 127.0.0.1 through a recording
proxy, runs one `-p` prompt with default settings, then an agent loop through the openai
SDK. The server runs a small chat-tuned test model (trained once, ~4 min) that ends its
turn and calls a tool when asked about a file. Slow (npm install of ~360 MB once, the
training, a ~30k-token prompt prefilled on CPU): run with `pytest -m slow`; skipped where
node and npm are absent."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(not (shutil.which("node") and shutil.which("npm")), reason="needs node and npm")
def test_claude_code_runs_against_megamesh_serve(tmp_path):
    out = tmp_path / "e2e.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "claude_code_e2e.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=3500, cwd=ROOT)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    res = json.loads(out.read_text())
    assert res["all_v1_2xx"] and res["claude_code_run"]["exit_status"] == 0
    assert any(e["path"] == "/v1/messages" and e["tools"] for e in res["requests"])
    assert any(e.get("stop_reason") == "end_turn" for e in res["requests"])  # it ended its turn
    assert res["openai_agent"]["tool_calls"] >= 2

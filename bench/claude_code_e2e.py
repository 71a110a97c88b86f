"""Claude Code, and an OpenAI-SDK agent loop, against `megamesh serve` on 127.0.0.1
(issue 32 point 5).

  python bench/claude_code_e2e.py [--run DIR] [--claude-code 2.1.328] [--out FILE]

1. Installs the pinned Claude Code from npm into runs/claude-code-<version> (once).
2. Starts `megamesh serve` on a small chat-tuned test model (`ensure_chat_run`: 0.9M
   parameters trained for 300 steps, ~4 min on CPU, on 4,000 rendered conversations
   whose assistant turn is always "Hi! How can I help you today?" and the end marker, so
   that it ends its turn: Claude Code treats a reply cut by max_tokens as an error) at a
   65,536-token context (past its trained length of 512: extrapolated; at Claude Code's
   ~30k-token prompt its reply is a few characters of code, then the end marker),
   answering to the model id Claude Code is given (`--alias`), every answer capped at
   --max-output-tokens.
3. A recording proxy between them logs every request (method, path, betas, body fields)
   and response status.
4. Runs `claude -p "say hi" --model ID` with only ANTHROPIC_BASE_URL and
   ANTHROPIC_API_KEY set (default settings otherwise), in an empty directory and home.
5. An agent loop through the `openai` SDK: tools, several turns, tool results fed back.
Checks: every /v1 response 2xx, the client exits 0 without an API error. Results as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_vs_hf import stop, wait_up  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REPLY = "Hi! How can I help you today?"


TOOLS = [{"name": "read_file", "description": "Read a file.",
          "input_schema": {"type": "object", "properties": {"path": {"type": "string", "maxLength": 8}},
                           "required": ["path"]}}]


def ensure_chat_run(run: Path) -> None:
    """A small model that ends its turn, trained by `megamesh train` on conversations
    rendered with the server's own chat template and tool format: a system prompt (a slice
    of the test corpus, sometimes with TOOLS rendered after it) and a user turn (a
    greeting, random words, or a question about a file); the assistant answers REPLY, or,
    when tools are offered and a file is asked about, calls read_file on it (and, after
    its result, calls it again or answers REPLY)."""
    if (run / "checkpoints").is_dir():
        return
    import random

    sys.path.insert(0, str(ROOT / "src"))
    from megamesh.serve import tools as tool_format
    from megamesh.serve.text import END, render_chat

    rng = random.Random(0)
    code = "\n".join(p.read_text(errors="replace")
                     for p in sorted((ROOT / "tests" / "data" / "corpus").rglob("*")) if p.is_file())
    words = code.split()
    asks = ["say hi", "hello", "hi there", "what can you do?", "help me with this code", "fix the bug"]
    files = ["setup.py", "main.py", "app.py", "util.py", "io.py", "test.py", "cli.py", "run.py"]
    rendered = tool_format.render_tools(tool_format.check_tools(TOOLS))
    run.mkdir(parents=True, exist_ok=True)
    data = run.parent / f"{run.name}-chat.jsonl"
    with open(data, "w") as f:
        for _ in range(4000):
            start = rng.randrange(0, len(code) - 2000)
            system = code[start:start + 4 * rng.randint(20, 400)]
            with_tools = rng.random() < 0.4
            if with_tools:
                system += "\n\n" + rendered
            kind = rng.random()
            if with_tools and kind < 0.5:  # a question about a file: call the tool
                name = rng.choice(files)
                call = tool_format.render_call("read_file", {"path": name})
                turns = [("user", f"What does {name} do?")]
                if rng.random() < 0.5:  # its result came back: call again, or answer
                    turns += [("assistant", call), ("user", tool_format.render_result(
                        code[start:start + rng.randint(20, 400)]))]
                    answer = call if rng.random() < 0.5 else REPLY
                else:
                    answer = call
            else:
                turns = [("user", rng.choice(asks) if kind < 0.8 else " ".join(
                    rng.choice(words) for _ in range(rng.randint(3, 60))))]
                answer = REPLY
            f.write(json.dumps({"text": render_chat(system, turns) + answer + END}) + "\n")
    subprocess.run([sys.executable, "-m", "megamesh.cli", "train", "--model", "tiny",
                    "--model.d_model=128", "--model.n_layers=2", "--model.n_heads=4",
                    "--model.n_kv_heads=2", "--model.d_ff=384", "--model.vocab_size=2048",
                    "--train.data.tokenizer_vocab=2048", "--data", str(data), "--steps", "300",
                    "--batch", "16", "--seq", "512", "--lr", "3e-3", "--out", str(run), "--no-progress",
                    "--train.log_every=100", "--train.checkpoint.every=300", "--train.eval.every=300"],
                   check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_claude_code(version: str) -> Path:
    """The `claude` binary of @anthropic-ai/claude-code@version (npm; its native package)."""
    where = ROOT / "runs" / f"claude-code-{version}"
    exe = where / "node_modules" / "@anthropic-ai" / "claude-code" / "bin" / "claude.exe"
    if not exe.exists() or exe.stat().st_size < 1_000_000:
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(where),
                        f"@anthropic-ai/claude-code@{version}"], check=True, timeout=900)
        # npm may skip the package's postinstall (it copies the platform binary in place)
        subprocess.run(["node", "install.cjs"], cwd=exe.parent.parent, check=True, timeout=300)
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    if version not in out.stdout:
        raise RuntimeError(f"claude --version said {out.stdout!r}")
    return exe


def start_proxy(target: str, log: list[dict]) -> tuple[str, threading.Thread, object]:
    """A recording reverse proxy to `target` (streams passed through)."""
    import uvicorn

    app = FastAPI()
    client = httpx.AsyncClient(base_url=target, timeout=httpx.Timeout(1800.0))

    @app.api_route("/{path:path}", methods=["GET", "POST", "HEAD", "DELETE", "PUT"])
    async def forward(request: Request, path: str):
        body = await request.body()
        entry: dict = {"method": request.method, "path": "/" + path, "query": request.url.query,
                       "beta": request.headers.get("anthropic-beta"), "t0": time.time()}
        try:
            data = json.loads(body) if body else None
            if isinstance(data, dict):
                entry["fields"] = sorted(data)
                entry["model"], entry["max_tokens"] = data.get("model"), data.get("max_tokens")
                entry["tools"] = len(data.get("tools") or [])
        except json.JSONDecodeError:
            pass
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        upstream = await client.send(client.build_request(request.method, "/" + path,
                                                          params=request.query_params,
                                                          headers=headers, content=body), stream=True)
        entry["status"] = upstream.status_code
        log.append(entry)

        async def chunks():
            text = b""
            async for c in upstream.aiter_raw():
                text += c if len(text) < 200_000 else b""
                yield c
            await upstream.aclose()
            entry["seconds"] = time.time() - entry["t0"]
            if upstream.status_code >= 400:
                entry["error"] = text[:2000].decode(errors="replace")
            elif b"event: error" in text:
                entry["error"] = "stream error event: " + text[text.index(b"event: error"):][:500].decode(
                    errors="replace")
            elif b"message_delta" in text:
                tail = text[text.rindex(b"message_delta"):][:400].decode(errors="replace")
                entry["stop_reason"] = tail.split('"stop_reason":"')[1].split('"')[0] \
                    if '"stop_reason":"' in tail else None

        keep = {k: v for k, v in upstream.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")}
        return StreamingResponse(chunks(), status_code=upstream.status_code, headers=keep)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    server.install_signal_handlers = lambda: None
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", thread, server


def openai_agent_loop(url: str, model: str, turns: int = 3) -> dict:
    """Tools, tool_choice required for the first turns, results fed back each turn."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
    tools = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                "parameters": t["input_schema"]}} for t in TOOLS]
    messages = [{"role": "system", "content": "You are a coding agent."},
                {"role": "user", "content": "What does setup.py do?"}]
    calls = 0
    for i in range(turns):
        out = client.chat.completions.create(model=model, messages=messages, tools=tools,
                                             tool_choice="required" if i < turns - 1 else "auto",
                                             max_tokens=32)
        msg = out.choices[0].message
        messages.append(msg.model_dump(exclude_none=True))
        for call in msg.tool_calls or []:
            calls += 1
            json.loads(call.function.arguments)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": "print('hello')"})
    return {"turns": turns, "tool_calls": calls, "messages": len(messages)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=str(ROOT / "runs" / "claude-code-chat"))
    ap.add_argument("--claude-code", default="2.1.328")
    ap.add_argument("--model-id", default="claude-sonnet-4-5")
    ap.add_argument("--max-output-tokens", type=int, default=256)
    ap.add_argument("--timeout", type=float, default=1500)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not (shutil.which("node") and shutil.which("npm")):
        raise SystemExit("node and npm are needed (Claude Code is an npm package)")
    exe = install_claude_code(args.claude_code)
    run = Path(args.run)
    ensure_chat_run(run)
    port = free_port()
    db = Path(tempfile.mkdtemp(prefix="megamesh-cc-")) / "b.db"
    cmd = [sys.executable, "-m", "megamesh.cli", "serve", "--model", str(run), "--port", str(port),
           "--max-len", "65536", "--slots", "2", "--alias", args.model_id,
           "--max-output-tokens", str(args.max_output_tokens), "--batch-db", str(db)]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
    url = f"http://127.0.0.1:{port}"
    log: list[dict] = []
    result: dict = {"claude_code": args.claude_code, "server": " ".join(cmd[2:])}
    try:
        wait_up(url, server)
        proxy, _, _ = start_proxy(url, log)
        home, work = Path(tempfile.mkdtemp(prefix="cc-home-")), Path(tempfile.mkdtemp(prefix="cc-work-"))
        env = {"PATH": os.environ["PATH"], "HOME": str(home), "ANTHROPIC_BASE_URL": proxy,
               "ANTHROPIC_API_KEY": "test-key"}
        t0 = time.time()
        cc = subprocess.run([str(exe), "-p", "say hi", "--model", args.model_id], cwd=work, env=env,
                            capture_output=True, text=True, timeout=args.timeout)
        result["claude_code_run"] = {"exit_status": cc.returncode, "seconds": time.time() - t0,
                                     "stdout": cc.stdout[-1500:], "stderr": cc.stderr[-1500:]}
        result["requests"] = [{k: v for k, v in e.items() if k != "t0"} for e in log]
        result["openai_agent"] = openai_agent_loop(url, args.model_id)
    finally:
        stop(server)
    api = [e for e in log if e["path"].startswith("/v1/")]
    result["all_v1_2xx"] = bool(api) and all(200 <= e["status"] < 300 and "error" not in e for e in api)
    result["ok"] = result["all_v1_2xx"] and result.get("claude_code_run", {}).get("exit_status") == 0
    path = Path(args.out or ROOT / "runs" / f"claude-code-e2e-{int(time.time())}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    for e in log:
        print(f"{e['method']} {e['path']}{'?' + e['query'] if e['query'] else ''} -> {e['status']} "
              f"{e.get('seconds', 0):.1f}s model={e.get('model')} max_tokens={e.get('max_tokens')} "
              f"tools={e.get('tools')} stop={e.get('stop_reason')} {e.get('error', '')[:200]}")
    print(json.dumps({k: v for k, v in result.items() if k not in ("requests",)}, indent=1)[:3000])
    print(f"results: {path}")
    if not result["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

"""The baseline for `bench/serve_vs_hf.py`: Hugging Face transformers' `generate` (torch,
CPU) behind the same streamed Messages API, so `megamesh bench serve` measures both
servers with the same client.

  python bench/hf_server.py --model HF_DIR --port 8001 --mode sequential
  python bench/hf_server.py --model HF_DIR --port 8001 --mode static --batch 32

- sequential: one request at a time (a lock around `generate`), tokens streamed by a
  streamer as generate produces them;
- static: up to --batch waiting requests are left-padded into one `generate` call (the
  batch is formed when the model is free, after waiting --batch-wait-ms for more); the
  next batch starts only when the whole batch is done (static batching).

Same prompt (megamesh's chat template and the run's tokenizer), greedy decoding, and
`ignore_eos` honoured through `min_new_tokens`, as in the megamesh server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import secrets
import threading
import time
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from megamesh.serve.text import Detokenizer, merge_turns, render_chat


class FanOut(BaseStreamer):
    """Receives each step's new tokens for the whole batch; hands row i's to sinks[i]."""

    def __init__(self, sinks: list):  # callables, thread-safe
        self.sinks, self.first = sinks, True

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # generate passes the prompt first
            self.first = False
            return
        for row, sink in zip(value.reshape(len(self.sinks), -1)[:, -1].tolist(), self.sinks):
            sink(row)

    def end(self) -> None:
        for sink in self.sinks:
            sink(None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--mode", choices=("sequential", "static"), default="sequential")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=50)
    args = ap.parse_args()

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(Path(args.model) / "tokenizer.json"))
    name = json.loads((Path(args.model) / "config.json").read_text()).get("_name_or_path") or "tiny"
    pad = 0
    jobs: queue.Queue = queue.Queue()

    def worker() -> None:
        while True:
            batch = [jobs.get()]
            if args.mode == "static":
                deadline = time.monotonic() + args.batch_wait_ms / 1e3
                while len(batch) < args.batch:
                    try:
                        batch.append(jobs.get(timeout=max(deadline - time.monotonic(), 0)))
                    except queue.Empty:
                        break
            n = max(len(ids) for ids, _, _ in batch)
            input_ids = torch.tensor([[pad] * (n - len(ids)) + ids for ids, _, _ in batch])
            mask = torch.tensor([[0] * (n - len(ids)) + [1] * len(ids) for ids, _, _ in batch])
            max_new = max(m for _, m, _ in batch)
            with torch.inference_mode():
                model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new,
                               min_new_tokens=max_new, do_sample=False, pad_token_id=pad,
                               streamer=FanOut([sink for _, _, sink in batch]))

    threading.Thread(target=worker, daemon=True).start()
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "type": "model"}]})

    @app.post("/v1/messages")
    async def messages(request: Request) -> StreamingResponse:
        body = await request.json()
        turns = merge_turns([(m["role"], m["content"]) for m in body["messages"]])
        ids = tok.encode(render_chat(body.get("system"), turns)).ids
        max_tokens = int(body["max_tokens"])
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        jobs.put((ids, max_tokens, lambda t: loop.call_soon_threadsafe(tokens.put_nowait, t)))

        def sse(event: str, data: dict) -> bytes:
            return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()

        async def events():
            mid = "msg_" + secrets.token_hex(8)
            yield sse("message_start", {"type": "message_start", "message": {
                "id": mid, "type": "message", "role": "assistant", "model": name, "content": [],
                "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": len(ids), "output_tokens": 0}}})
            yield sse("content_block_start", {"type": "content_block_start", "index": 0,
                                              "content_block": {"type": "text", "text": ""}})
            detok, n = Detokenizer(tok, ids), 0
            while n < max_tokens:
                t = await tokens.get()
                if t is None:
                    break
                n += 1
                text = detok.push(t)
                if text:
                    yield sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                      "delta": {"type": "text_delta", "text": text}})
            yield sse("content_block_stop", {"type": "content_block_stop", "index": 0})
            yield sse("message_delta", {"type": "message_delta",
                                        "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                                        "usage": {"output_tokens": n}})
            yield sse("message_stop", {"type": "message_stop"})

        return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

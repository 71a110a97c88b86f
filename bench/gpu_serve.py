"""Serving on one GPU: the megamesh engine vs Hugging Face transformers, same model, same load.

The model: bench/gpu_train.py's 1.14B Llama shape, random weights in bf16, written once as
a Hugging Face directory (`--model-dir`; config.json, model.safetensors and a word-level
tokenizer.json whose token i is the word "w<i>", so any token ids round-trip through text
exactly) that every system loads: the same weights everywhere.

The load (`--requests`, default 256): prompts of uniform 512-2,048 random tokens, outputs
of uniform 128-512 tokens, end-of-sequence ignored, greedy; the same ids in every system.
Modes: `offline` (all requests at once), `poisson` (arrivals at `--rate` requests/s; by
default 0.8 x the request throughput of the first system's offline row, "near
saturation"), `batch1` (one request of 512 + 256 tokens alone: decode time per token vs
the HBM roofline, weight bytes / `--hbm` (4.8e12 B/s: NVIDIA's H200 datasheet)).

Systems, each in its own worker process (bench/workers.py: timeout, killed with its
process group, each row appended to `--out` at once, `--budget` for the whole run):
- megamesh: the engine through its Python API (`build_engine` + `Engine.submit`; loads
  nothing the GPU image lacks);
- megamesh-http: `megamesh serve` over HTTP (the Messages API, streamed; the same client
  as `megamesh bench serve`), which adds the server's own cost (on the GPU image it needs
  the wheels of bench/gpu_wheels.sh);
- hf-cb: transformers' continuous batching (`init_continuous_batching`, paged attention),
  requests streamed;
- megamesh-sync (not by default): the engine waiting for each decode's tokens before
  the next step (`Engine.overlap` off), to measure what the overlap gives;
- megamesh-fp8w, megamesh-int8w (not by default): the engine with `--weights fp8` /
  `int8` (the layers' matmul weights quantized at load: 1 byte per weight read per
  decode step; issue 25 point 6);
- hf-static: transformers `generate` with a static cache, batches of `--static-batch`
  requests left-padded to the longest prompt of the load (one compiled shape), formed
  from the requests that have arrived when the model is free.
Per request: TTFT = first token - arrival, TPOT = (last token - first token) / (output
tokens - 1), from the time each system hands the tokens over (its emit callback, stream
or streamer). Output tokens/s = all output tokens / (last finish - first arrival).

    PYTHONPATH=src python bench/gpu_serve.py --modes offline --out $OUT/serve.jsonl --cache /tmp/jax-cache
    PYTHONPATH=src python bench/gpu_serve.py --modes poisson,batch1 --rate R --out $OUT/serve2.jsonl
    python bench/gpu_serve.py --table serve.jsonl

`--tiny`: a 2-layer model and a small load, a check of this script on CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from gpu_train import MODEL, TINY  # the same model shapes as the training benchmark
from workers import (
    Budget,
    Rows,
    compilation_cache_env,
    emit,
    error_row,
    not_loaded,
    read_rows,
    run_worker,
    timeouts_for,
)

LOAD = {"requests": 256, "prompt": (512, 2048), "output": (128, 512), "batch1": (512, 256)}
TINY_LOAD = {"requests": 8, "prompt": (16, 64), "output": (4, 16), "batch1": (32, 16)}
SYSTEMS = ("megamesh", "megamesh-http", "hf-cb", "hf-static", "megamesh-sync", "megamesh-fp8w",
           "megamesh-int8w")
MODES = ("offline", "poisson", "batch1")


# -- the model directory and the load --------------------------------------------------

def prepare(model_dir: Path, model: dict) -> None:
    """Random bf16 weights as a Hugging Face directory with a word-level tokenizer."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    conf = transformers.LlamaConfig(
        hidden_size=model["d_model"], num_hidden_layers=model["n_layers"],
        num_attention_heads=model["n_heads"], num_key_value_heads=model["n_kv_heads"],
        head_dim=model["head_dim"], intermediate_size=model["d_ff"], vocab_size=model["vocab_size"],
        max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    net = transformers.LlamaForCausalLM(conf).to(torch.bfloat16)
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    net.save_pretrained(tmp)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(model["vocab_size"])}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp / "tokenizer.json"))
    os.replace(tmp, model_dir)


def make_load(load: dict, vocab: int, rate: float | None, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    n = load["requests"]
    prompts = [rng.integers(1, vocab, int(rng.integers(load["prompt"][0], load["prompt"][1] + 1))).tolist()
               for _ in range(n)]
    outputs = [int(rng.integers(load["output"][0], load["output"][1] + 1)) for _ in range(n)]
    arrivals = [0.0] * n
    if rate:
        arrivals = np.cumsum(np.concatenate([[0.0], rng.exponential(1 / rate, n - 1)])).tolist()
    return {"prompts": prompts, "outputs": outputs, "arrivals": arrivals}


def batch1_load(load: dict, vocab: int) -> dict:
    import numpy as np

    n_in, n_out = load["batch1"]
    ids = np.random.default_rng(1).integers(1, vocab, n_in).tolist()
    return {"prompts": [ids], "outputs": [n_out], "arrivals": [0.0]}


def summarize(reqs: list[dict], started: float) -> dict:
    """Throughput and latency percentiles of per-request (arrival, first, last, n) times."""
    import numpy as np

    ok = [r for r in reqs if r.get("n")]
    if not ok:
        return {"error": "no request completed"}
    out_tokens = sum(r["n"] for r in ok)
    span = max(r["last"] for r in ok) - started
    ttft = [r["first"] - r["arrival"] for r in ok]
    tpot = [(r["last"] - r["first"]) / (r["n"] - 1) for r in ok if r["n"] > 1]

    def pct(xs, q):
        return float(np.percentile(np.asarray(xs) * 1e3, q)) if xs else float("nan")

    return {"completed": len(ok), "failed": len(reqs) - len(ok), "output_tokens": out_tokens,
            "duration_s": span, "output_tokens_per_s": out_tokens / span,
            "request_throughput": len(ok) / span,
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "tpot_ms_p50": pct(tpot, 50), "tpot_ms_p99": pct(tpot, 99)}


# -- the systems ------------------------------------------------------------------------

def drive(load: dict, submit, wait_all) -> tuple[list[dict], float]:
    """Submit each request at its arrival time (from a thread); `submit(i, record)`
    starts request i, whose tokens call record(n_so_far)."""
    reqs = [{"arrival": 0.0, "first": None, "last": None, "n": 0} for _ in load["prompts"]]

    def recorder(i):
        def record(n):
            t = time.perf_counter()
            r = reqs[i]
            if r["first"] is None:
                r["first"] = t
            r["last"], r["n"] = t, n
        return record

    started = time.perf_counter()
    for i, at in enumerate(load["arrivals"]):
        delay = started + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        reqs[i]["arrival"] = time.perf_counter()
        submit(i, recorder(i))
    wait_all()
    return reqs, started


def run_megamesh(model_dir: str, load: dict, slots: int, max_len: int, overlap: bool = True,
                 weights: str = "bf16") -> dict:
    import jax

    from megamesh.serve.engine import SamplingParams, build_engine

    engine = build_engine(model_dir, mesh="tensor=1", slots=slots, max_len=max_len,
                          max_queue=len(load["prompts"]) + 8, dtype="bfloat16", weights=weights,
                          log=lambda *a: None)
    engine.overlap = overlap
    t0 = time.perf_counter()
    engine.start()
    engine.compiled_all.wait()
    warm = time.perf_counter() - t0
    left = threading.Semaphore(0)

    def submit(i, record):
        def on(ev):
            if ev.output_tokens:
                record(ev.output_tokens)
            if ev.done:
                left.release()
        engine.submit(load["prompts"][i], SamplingParams(max_tokens=load["outputs"][i], temperature=0.0,
                                                         ignore_eos=True), on)

    def wait_all():
        for _ in load["prompts"]:
            left.acquire()

    try:
        reqs, started = drive(load, submit, wait_all)
    finally:
        engine.stop()
    return {"requests": reqs, "started": started, "warmup_s": warm, "slots": slots,
            "imported": not_loaded(), "decode_steps": engine.stats["decode_steps"],
            "fed_on_device": engine.stats["decode_steps_fed_on_device"],
            "versions": {"jax": jax.__version__}}


def run_megamesh_http(model_dir: str, load: dict, slots: int, max_len: int) -> dict:
    import socket

    from tokenizers import Tokenizer

    from megamesh import loadgen

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "megamesh.cli", "serve", "--model", model_dir, "--port", str(port),
           "--mesh", "tensor=1", "--slots", str(slots), "--max-len", str(max_len), "--dtype", "bfloat16",
           "--max-queue", str(len(load["prompts"]) + 8), "--max-concurrent-per-key", "100000",
           "--batch-db", str(Path(tempfile.mkdtemp()) / "batches.db")]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    prompts = [loadgen.BenchPrompt(tok.decode(ids), len(ids), n)
               for ids, n in zip(load["prompts"], load["outputs"])]
    gaps = [b - a for a, b in zip([0.0] + load["arrivals"], load["arrivals"])]  # its own arrivals
    cfg = loadgen.BenchConfig(url=f"http://127.0.0.1:{port}", num_prompts=len(prompts), warmups=2)
    import httpx

    try:
        t0 = time.perf_counter()
        while True:  # up (loading, compiling), then the client waits for every bucket
            if server.poll() is not None:
                raise RuntimeError(f"megamesh serve exited {server.returncode}: "
                                   f"{server.stderr.read()[-1500:]}")
            try:
                if httpx.get(cfg.url + "/health/live", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        up = time.perf_counter() - t0
        results, duration, _, _ = asyncio.run(loadgen._run(cfg, prompts, gaps))
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    reqs = []
    for r in results:  # RequestResult times are relative to its own start
        if not r.ok:
            reqs.append({"n": 0, "error": r.error})
            continue
        reqs.append({"arrival": r.start, "first": r.start + r.ttft, "last": r.start + r.latency,
                     "n": r.output_tokens})
    started = min(r.start for r in results)
    return {"requests": reqs, "started": started, "up_s": up, "slots": slots}


def _hf_model(model_dir: str):
    import torch
    import transformers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    net = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(dev).eval()
    return net, dev, {"torch": torch.__version__, "transformers": transformers.__version__}


def run_hf_cb(model_dir: str, load: dict, slots: int, max_len: int) -> dict:
    import transformers

    net, dev, versions = _hf_model(model_dir)
    gen = transformers.GenerationConfig(max_new_tokens=max(load["outputs"]), do_sample=False,
                                        eos_token_id=None, pad_token_id=0)
    manager = net.init_continuous_batching(generation_config=gen)
    manager.start()
    t0 = time.perf_counter()  # its first request sets up the paged cache: not measured
    manager.add_request(load["prompts"][0][:8], request_id="warm-up", max_new_tokens=2)
    while not ((out := manager.get_result(timeout=1.0)) and out.is_finished()):
        if not manager.is_running():
            raise RuntimeError("transformers' continuous batching stopped during its warm-up")
    warm = time.perf_counter() - t0
    records: dict[str, object] = {}
    done = threading.Event()
    finished = [0]

    def consume():
        while finished[0] < len(load["prompts"]):
            out = manager.get_result(timeout=0.5)
            if out is None:
                if not manager.is_running():
                    break
                continue
            if out.generated_tokens:
                records[out.request_id](len(out.generated_tokens))
            if out.is_finished():
                finished[0] += 1
        done.set()

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()

    def submit(i, record):
        records[f"r{i}"] = record
        manager.add_request(load["prompts"][i], request_id=f"r{i}", max_new_tokens=load["outputs"][i],
                            streaming=True)

    try:
        reqs, started = drive(load, submit, done.wait)
    finally:
        manager.stop(block=True, timeout=30)
    return {"requests": reqs, "started": started, "warmup_s": warm, "versions": versions}


def run_hf_static(model_dir: str, load: dict, batch: int, max_len: int) -> dict:
    import torch
    from transformers.generation.streamers import BaseStreamer

    net, dev, versions = _hf_model(model_dir)
    width = max(len(p) for p in load["prompts"])  # every batch the same shape: one compile
    steps = max(load["outputs"])

    class Steps(BaseStreamer):
        def __init__(self):
            self.times, self.first = [], True

        def put(self, value):
            if self.first:  # the prompt
                self.first = False
                return
            self.times.append(time.perf_counter())

        def end(self):
            pass

    reqs = [{"arrival": 0.0, "first": None, "last": None, "n": 0} for _ in load["prompts"]]
    started = time.perf_counter()
    arrivals = [started + a for a in load["arrivals"]]
    nxt = 0
    while nxt < len(reqs):
        now = time.perf_counter()
        if arrivals[nxt] > now:
            time.sleep(arrivals[nxt] - now)
            now = time.perf_counter()
        members = [i for i in range(nxt, min(nxt + batch, len(reqs))) if arrivals[i] <= now]
        nxt = members[-1] + 1
        ids = torch.zeros((batch, width), dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for row, i in enumerate(members):
            p = load["prompts"][i]
            ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
        mask[len(members):, -1] = 1  # padding rows: one token, their output unused
        streamer = Steps()
        with torch.no_grad():
            net.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=steps,
                         min_new_tokens=steps, do_sample=False, cache_implementation="static",
                         streamer=streamer, pad_token_id=0)
        for i in members:
            n = load["outputs"][i]
            reqs[i].update(arrival=arrivals[i], first=streamer.times[0], last=streamer.times[n - 1], n=n)
    return {"requests": reqs, "started": started, "static_batch": batch, "padded_to": width,
            "versions": versions}


RUNNERS = {"megamesh": run_megamesh, "megamesh-http": run_megamesh_http, "hf-cb": run_hf_cb,
           "hf-static": run_hf_static,
           "megamesh-sync": lambda *a: run_megamesh(*a, overlap=False),
           "megamesh-fp8w": lambda *a: run_megamesh(*a, weights="fp8"),
           "megamesh-int8w": lambda *a: run_megamesh(*a, weights="int8")}


def worker(system: str, model_dir: str, load_path: str, size: int, max_len: int) -> None:
    load = json.loads(Path(load_path).read_text())
    try:
        out = RUNNERS[system](model_dir, load, size, max_len)
    except Exception as e:  # noqa: BLE001 - a failure is a row too
        emit(error_row(e))
        return
    reqs = out.pop("requests")
    emit({**out, **summarize(reqs, out.pop("started"))})


# -- the run ------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", nargs=5, metavar=("SYSTEM", "MODEL_DIR", "LOAD", "SIZE", "MAX_LEN"))
    ap.add_argument("--prepare", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--systems", default=",".join(SYSTEMS[:4]), help=f"any of {','.join(SYSTEMS)}")
    ap.add_argument("--modes", default=",".join(MODES), help=f"any of {','.join(MODES)}")
    ap.add_argument("--requests", type=int, help="requests per load (default 256; --tiny 8)")
    ap.add_argument("--rate", type=float, help="poisson arrivals per second (default: 0.8 x the "
                    "first system's offline request throughput)")
    ap.add_argument("--slots", type=int, default=256, help="megamesh --slots (running requests)")
    ap.add_argument("--static-batch", type=int, default=64, help="hf-static batch size")
    ap.add_argument("--hbm", type=float, default=4.8e12, help="HBM bytes/s for the roofline")
    ap.add_argument("--model-dir", default="/tmp/megamesh-gpu-serve-model",
                    help="the Hugging Face directory every system loads (written if missing)")
    ap.add_argument("--tiny", action="store_true", help="small model and load (a CPU check)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per worker process")
    ap.add_argument("--timeout-for", action="append", default=[], metavar="SYSTEM=S")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run")
    ap.add_argument("--cache", help="jax's persistent compilation cache directory for workers")
    ap.add_argument("--out", help="JSONL results file, a line per measurement as it ends")
    ap.add_argument("--table", metavar="JSONL", help="print the table of a results file and exit")
    args = ap.parse_args()
    if args.prepare:
        prepare(Path(args.prepare), TINY if args.tiny else MODEL)
        emit({"ok": True})
        return 0
    if args.worker:
        system, model_dir, load_path, size, max_len = args.worker
        worker(system, model_dir, load_path, int(size), int(max_len))
        return 0
    if args.table:
        header, rows = read_rows(args.table)
        print(table(rows, header))
        return 0
    systems, modes = args.systems.split(","), args.modes.split(",")
    for flag, got, allowed in (("--systems", systems, SYSTEMS), ("--modes", modes, MODES)):
        bad = [x for x in got if x not in allowed]
        if bad:
            print(f"{flag}: {bad} not allowed: any of {', '.join(allowed)}", file=sys.stderr)
            return 2
    timeouts = timeouts_for(args.timeout, args.timeout_for, SYSTEMS)
    model, load = (TINY, dict(TINY_LOAD)) if args.tiny else (MODEL, dict(LOAD))
    if args.requests:
        load["requests"] = args.requests
    max_len = load["prompt"][1] + load["output"][1]
    weight_bytes = 2 * (2 * model["vocab_size"] * model["d_model"] + model["n_layers"] * (
        model["d_model"] * model["head_dim"] * (2 * model["n_heads"] + 2 * model["n_kv_heads"])
        + 3 * model["d_model"] * model["d_ff"] + 2 * model["d_model"]) + model["d_model"])
    header = {"model": model, "load": load, "hbm": args.hbm, "weight_bytes": weight_bytes,
              "roofline_ms_per_token": weight_bytes / args.hbm * 1e3}
    rows, budget = Rows(args.out, header), Budget(args.budget)
    env = compilation_cache_env(args.cache)
    here = Path(__file__).resolve().parent
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(here.parent / "src"), env.get("PYTHONPATH")) if p)
    model_dir = Path(args.model_dir)
    if not (model_dir / "model.safetensors").exists():
        t0 = time.perf_counter()
        r = run_worker([sys.executable, __file__, "--prepare", str(model_dir)]
                       + (["--tiny"] if args.tiny else []), min(args.timeout, 300), env)
        if "error" in r:
            print(f"writing the model directory {model_dir} failed: {r['error']}", file=sys.stderr)
            return 1
        print(f"model directory {model_dir} written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    loads_dir = Path(args.out).parent if args.out else Path(model_dir).parent
    rate = args.rate
    for mode in modes:
        if mode == "poisson" and rate is None:
            offline = [r for r in rows.rows if r["mode"] == "offline" and "request_throughput" in r]
            if not offline:
                rows.add({"mode": mode, "system": "-", "error": "no --rate and no offline row to derive it"})
                continue
            rate = 0.8 * offline[0]["request_throughput"]
        data = (batch1_load(load, model["vocab_size"]) if mode == "batch1"
                else make_load(load, model["vocab_size"], rate if mode == "poisson" else None))
        load_path = loads_dir / f"gpu-serve-load-{mode}-{os.getpid()}.json"
        load_path.write_text(json.dumps(data))
        for system in systems:
            row = {"mode": mode, "system": system, **({"rate": rate} if mode == "poisson" else {})}
            timeout = budget.timeout(timeouts[system])
            size = args.static_batch if system == "hf-static" else args.slots
            if mode == "batch1" and system == "hf-static":
                size = 1  # (megamesh keeps its slots: the same compiled shapes, from the cache)
            if timeout is None:
                row.update(error="skipped: the --budget ran out", oom=False)
            else:
                row.update(run_worker([sys.executable, __file__, "--worker", system, str(model_dir),
                                       str(load_path), str(size), str(max_len)], timeout, env))
            if mode == "batch1" and "tpot_ms_p50" in row:
                row["roofline_share"] = header["roofline_ms_per_token"] / row["tpot_ms_p50"]
            rows.add(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        load_path.unlink()
    print(table(rows.rows, header))
    return 0


def table(rows: list[dict], header: dict) -> str:
    """Markdown: a row per mode and system; offline ratios to hf-cb."""
    base = {r["mode"]: r.get("output_tokens_per_s") for r in rows if r.get("system") == "hf-cb"}
    out = ["| mode | system | output tok/s | vs hf-cb | TTFT p50 / p99 ms | TPOT p50 / p99 ms | notes |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "output_tokens_per_s" not in r:
            error = " ".join(str(r.get("error", "")).split())[:90].replace("|", "/")
            out.append(f"| {r['mode']} | {r['system']} | {error} | | | | |")
            continue
        b = base.get(r["mode"])
        notes = []
        if "roofline_share" in r:
            notes.append(f"{r['roofline_share']:.0%} of HBM roofline "
                         f"({header.get('roofline_ms_per_token', 0):.2f} ms/token)")
        if "rate" in r:
            notes.append(f"{r['rate']:.2f} req/s")
        if r.get("failed"):
            notes.append(f"{r['failed']} failed")
        out.append(f"| {r['mode']} | {r['system']} | {r['output_tokens_per_s']:,.0f} | "
                   f"{r['output_tokens_per_s'] / b:.2f}x | " if b else
                   f"| {r['mode']} | {r['system']} | {r['output_tokens_per_s']:,.0f} | - | ")
        out[-1] += (f"{r['ttft_ms_p50']:,.0f} / {r['ttft_ms_p99']:,.0f} | "
                    f"{r['tpot_ms_p50']:.1f} / {r['tpot_ms_p99']:.1f} | {'; '.join(notes)} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())

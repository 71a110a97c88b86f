"""`megamesh serve` as it is operated: a soak, then abuse, each with a normal client
measured alongside, then SIGTERM with requests in flight (issue 31).

  python bench/serve_soak.py [--run DIR] [--soak-seconds 300] [--block-seconds 30]

1. A megamesh training run of the `tiny` preset (trained for 2 steps if DIR has none);
   `megamesh serve` on 127.0.0.1 under an open-file limit of 1,024 (systemd's default;
   the server caps its connections below it), --drain-seconds 30.
2. Soak: --clients clients for --soak-seconds, each looping over the four kinds of
   request (Anthropic and OpenAI, streamed and not; 16 output tokens); the server's RSS
   every 10 s; latency percentiles and status counts.
3. Abuse blocks of --block-seconds, each with one normal client (non-streamed Messages
   requests of 8 tokens, one after another, on a kept-alive connection, as an SDK does,
   with an API key of its own)
   measured alongside, vs the same client alone:
   slowloris (300 connections sending a header byte every 5 s), stalled bodies (20
   connections declaring 10 MB and sending 100 bytes), an idle-connection flood (1,124
   connections that send nothing: more than the open-file limit), hostile bodies (8.8 MB
   of 500,000 unknown keys, one after another), clients leaving mid-body, malformed
   chunked bodies, and 200 streams cancelled after their first event.
   Per block: the normal client's p50/p99 and failures, /health's worst latency, the
   server's status counts (5xx split into real refusals and 500s) and what the abusive
   connections got.
4. SIGTERM with 7 streams and 1 non-streamed request in flight: how each ended, the
   exit status, whether the log holds a traceback.
Writes JSON (--out) and prints the markdown rows for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_vs_hf import ensure_run, stop, wait_up  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HELLO = [{"role": "user", "content": "def parse(line):"}]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def statuses(url: str) -> dict[str, float]:
    """megamesh_http_requests_total summed by status."""
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("megamesh_http_requests_total{"):
            status = line.split('status="')[1].split('"')[0]
            out[status] = out.get(status, 0) + float(line.split()[-1])
    return out


def metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.split()[-1])
    return total


def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, int]:
    return {k: int(b.get(k, 0) - a.get(k, 0)) for k in sorted(set(a) | set(b))
            if b.get(k, 0) - a.get(k, 0)}


# ----------------------------------------------------------------------------- clients


def one_request(c: httpx.Client, kind: str, max_tokens: int, key: str = "normal") -> int:
    """One request of `kind` (anthropic|openai, -stream or not), read to its end; its status
    (599: a network error; 598: a stream that ended without its last event)."""
    stream = kind.endswith("-stream")
    if kind.startswith("anthropic"):
        path, body = "/v1/messages", {"model": "tiny", "max_tokens": max_tokens, "messages": HELLO}
    else:
        path, body = "/v1/chat/completions", {"model": "tiny", "max_tokens": max_tokens,
                                              "messages": HELLO}
    body["stream"] = stream
    headers = {"x-api-key": key}
    try:
        if not stream:
            return c.post(path, json=body, headers=headers).status_code
        with c.stream("POST", path, json=body, headers=headers) as r:
            text = r.read().decode()
            if r.status_code != 200:
                return r.status_code
            done = "message_stop" in text if kind.startswith("anthropic") else "[DONE]" in text
            return 200 if done else 598
    except httpx.HTTPError:
        return 599


def normal_client(url: str, until: float, out: dict) -> None:
    """Non-streamed 8-token Messages requests one after another, kept-alive, until `until`."""
    lat, fails = [], 0
    with httpx.Client(base_url=url, timeout=120) as c:
        while time.monotonic() < until:
            t0 = time.perf_counter()
            status = one_request(c, "anthropic", 8)
            if status == 200:
                lat.append(time.perf_counter() - t0)
            else:
                fails += 1
                time.sleep(0.05)
    out.update(n=len(lat), fails=fails, p50=pct(lat, 0.5), p99=pct(lat, 0.99))


def health_prober(url: str, until: float, out: dict) -> None:
    """/health on new connections (as a kubelet probes) every 0.2 s: worst latency, fails."""
    worst, fails, n = 0.0, 0, 0
    while time.monotonic() < until:
        t0 = time.perf_counter()
        try:
            ok = httpx.get(url + "/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            ok = False
        worst = max(worst, time.perf_counter() - t0)
        fails += not ok
        n += 1
        time.sleep(0.2)
    out.update(health_worst_s=worst, health_fails=fails, health_n=n)


# ----------------------------------------------------------------------------- abusers


def raw_until_closed(port: int, data: bytes, trickle: bytes = b"", every: float = 0.0,
                     until: float = 0.0) -> tuple[str, float]:
    """Connect, send `data` (then a byte of `trickle` every `every` s until `until`), read
    until the server closes: (its status line or 'closed'/'reset'/'refused', seconds)."""
    t0 = time.monotonic()
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        return "refused", 0.0
    try:
        s.sendall(data)
        got = b""
        for b in trickle:
            if time.monotonic() > until:
                break
            s.settimeout(every)
            try:
                chunk = s.recv(65536)
                got += chunk
                if not chunk:
                    break
            except TimeoutError:
                s.sendall(bytes([b]))
        s.settimeout(max(1.0, until - time.monotonic()) + 90)
        while chunk := s.recv(65536):
            got += chunk
        line = got.split(b"\r\n", 1)[0].decode(errors="replace")
        return (line or "closed"), time.monotonic() - t0
    except (ConnectionResetError, BrokenPipeError):
        return "reset", time.monotonic() - t0
    except TimeoutError:
        return "still open", time.monotonic() - t0
    finally:
        s.close()


def summarize_abusers(results: list[tuple[str, float]]) -> str:
    counts: dict[str, int] = {}
    for line, _ in results:
        key = " ".join(line.split()[1:2]) if line.startswith("HTTP/") else line
        counts[key] = counts.get(key, 0) + 1
    secs = [t for _, t in results]
    what = ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"{what} (closed after {statistics.median(secs):.1f} s median)" if secs else what


def block(url: str, port: int, name: str, seconds: float, abuse) -> dict:
    """Run `abuse(until)` (returns a description) with a normal client and /health probes."""
    before = statuses(url)
    until = time.monotonic() + seconds
    normal: dict = {}
    health: dict = {}
    threads = [threading.Thread(target=normal_client, args=(url, until, normal)),
               threading.Thread(target=health_prober, args=(url, until, health))]
    for t in threads:
        t.start()
    what = abuse(until) if abuse else ""
    for t in threads:
        t.join()
    time.sleep(1)
    return {"block": name, **normal, **health, "abusers": what,
            "statuses": delta(before, statuses(url))}


def slowloris(port: int, n: int = 300):
    def run(until: float) -> str:
        with cf.ThreadPoolExecutor(n) as pool:
            futs = [pool.submit(raw_until_closed, port, b"POST /v1/messages HTTP/1.1\r\nhost: x\r\n",
                                b"x-a: b\r\n" * 200, 5.0, until) for _ in range(n)]
            return summarize_abusers([f.result() for f in futs])
    return run


def stalled_bodies(port: int, n: int = 20):
    def run(until: float) -> str:
        head = (b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: 10000000\r\n\r\n" + b"{" * 100)
        with cf.ThreadPoolExecutor(n) as pool:
            futs = [pool.submit(raw_until_closed, port, head, b"", 0, until) for _ in range(n)]
            return summarize_abusers([f.result() for f in futs])
    return run


def idle_flood(port: int, n: int = 1124):
    def run(until: float) -> str:
        socks, refused = [], 0
        for _ in range(n):
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                refused += 1
        time.sleep(max(0.0, until - time.monotonic()))
        state = {"open": 0, "closed": 0, "reset": 0}
        for s in socks:
            s.setblocking(False)
            try:
                state["closed" if s.recv(1) == b"" else "open"] += 1
            except BlockingIOError:
                state["open"] += 1  # nothing to read, not closed: still held
            except OSError:
                state["reset"] += 1
            s.close()
        return (f"{n} opened ({refused} refused at connect); at the block's end {state['open']} "
                f"open, {state['closed']} closed, {state['reset']} reset by the server")
    return run


def repeat(fn, name: str):
    def run(until: float) -> str:
        results = []
        while time.monotonic() < until:
            results.append(fn())
        counts: dict[str, int] = {}
        for r in results:
            counts[r] = counts.get(r, 0) + 1
        return f"{len(results)} {name}: " + ", ".join(f"{v} {k}" for k, v in counts.items())
    return run


def hostile_body(url: str):
    keys = {f"k{i:06d}": 1 for i in range(500_000)}
    raw = json.dumps({"model": "tiny", "max_tokens": 3, "messages": HELLO, **keys}).encode()

    def one() -> str:
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/messages", content=raw, timeout=120,
                       headers={"content-type": "application/json"})
        return f"{r.status_code} in {time.perf_counter() - t0:.1f} s"
    return repeat(one, f"{len(raw) / 1e6:.1f} MB bodies")


def leave_mid_body(port: int):
    def one() -> str:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: 1000\r\n\r\n" + b'{"model": ')
        time.sleep(0.02)
        return "left"
    return repeat(one, "clients leaving mid-body")


def bad_chunks(port: int):
    def one() -> str:
        line, _ = raw_until_closed(port, b"POST /v1/messages HTTP/1.1\r\nhost: x\r\n"
                                         b"transfer-encoding: chunked\r\n\r\nzz\r\nnot a chunk\r\n")
        return line
    return repeat(one, "malformed chunked bodies")


def cancelled_streams(url: str, n: int = 200):
    def run(until: float) -> str:
        before = metric(url, "megamesh_output_tokens_total")

        def one(_: int) -> None:
            body = {"model": "tiny", "max_tokens": 200, "ignore_eos": True, "stream": True,
                    "messages": HELLO}
            with httpx.stream("POST", url + "/v1/messages", json=body, timeout=60,
                              headers={"x-api-key": "abuse"}) as r:
                for line in r.iter_lines():
                    if line.startswith("event: message_start"):
                        break

        with cf.ThreadPoolExecutor(16) as pool:
            list(pool.map(one, range(n)))
        time.sleep(max(0.0, until - time.monotonic()))
        made = metric(url, "megamesh_output_tokens_total") - before
        return f"{n} streams cancelled after message_start: {made:.0f} tokens generated in all"
    return run


# ----------------------------------------------------------------------------- main


def soak(url: str, pid: int, clients: int, seconds: float) -> dict:
    kinds = ["anthropic", "anthropic-stream", "openai", "openai-stream"]
    lat: list[float] = []
    codes: dict[int, int] = {}
    lock = threading.Lock()
    until = time.monotonic() + seconds
    rss: list[tuple[float, float]] = []
    t_start = time.monotonic()

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            k = i
            while time.monotonic() < until:
                t0 = time.perf_counter()
                status = one_request(c, kinds[k % 4], 16, key=f"soak-{i}")
                with lock:
                    codes[status] = codes.get(status, 0) + 1
                    if status == 200:
                        lat.append(time.perf_counter() - t0)
                k += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    while time.monotonic() < until:
        rss.append((time.monotonic() - t_start, rss_mb(pid)))
        time.sleep(10)
    for t in threads:
        t.join()
    rss.append((time.monotonic() - t_start, rss_mb(pid)))
    after_1min = next((m for t, m in rss if t >= 60), rss[0][1])
    return {"clients": clients, "seconds": seconds, "requests": sum(codes.values()),
            "codes": {str(k): v for k, v in sorted(codes.items())}, "p50": pct(lat, 0.5),
            "p99": pct(lat, 0.99), "rss_mb": rss, "rss_growth_after_1min_mb": rss[-1][1] - after_1min}


def sigterm(url: str, proc: subprocess.Popen, log: list[str]) -> dict:
    outcomes: list[str] = []
    started = threading.Barrier(9)

    def stream_one() -> None:
        body = {"model": "tiny", "max_tokens": 300, "ignore_eos": True, "stream": True,
                "messages": HELLO}
        try:
            with httpx.stream("POST", url + "/v1/messages", json=body, timeout=120) as r:
                last, first = None, True
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        last = line[7:]
                        if first:
                            first = False
                            started.wait()
                outcomes.append(last or "nothing")
        except httpx.HTTPError as e:
            outcomes.append(type(e).__name__)

    def plain_one() -> None:
        body = {"model": "tiny", "max_tokens": 300, "ignore_eos": True, "messages": HELLO}
        with httpx.Client(timeout=120) as c:
            fut = threading.Thread(target=lambda: outcomes.append(
                str(c.post(url + "/v1/messages", json=body).status_code)))
            fut.start()
            started.wait()
            fut.join()

    threads = [threading.Thread(target=stream_one) for _ in range(7)] + [threading.Thread(target=plain_one)]
    for t in threads:
        t.start()
    started.wait()
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    exit_s = time.monotonic() - t0
    for t in threads:
        t.join()
    rest = proc.stdout.read() if proc.stdout else ""
    text = "".join(log) + rest
    return {"exit_status": rc, "exit_after_s": exit_s, "outcomes": sorted(outcomes),
            "traceback_in_log": "Traceback" in text or "Exception in ASGI" in text,
            "log_tail": text[-600:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=str(ROOT / "runs" / "bench-tiny"))
    ap.add_argument("--port", type=int, default=8330)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--soak-seconds", type=float, default=300)
    ap.add_argument("--block-seconds", type=float, default=30)
    ap.add_argument("--out", default=None, help="JSON results (default: a new file under runs/)")
    ap.add_argument("--server-args", default="", help="more `megamesh serve` flags (quoted)")
    args = ap.parse_args()
    run = Path(args.run)
    ensure_run(run)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this process opens 1,124+
    cmd = [sys.executable, "-m", "megamesh.cli", "serve", "--model", str(run), "--port",
           str(args.port), "--max-len", "1024", "--drain-seconds", "30",
           "--batch-db", str(run / "soak-batches.db"), *args.server_args.split()]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"},
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)))
    url, port = f"http://127.0.0.1:{args.port}", args.port
    log: list[str] = []
    threading.Thread(target=lambda: [log.append(x) for x in iter(proc.stdout.readline, "")],
                     daemon=True).start()
    out: dict = {"command": " ".join(sys.argv), "server": " ".join(cmd[2:])}
    try:
        wait_up(url, proc)
        print("soak ...", flush=True)
        out["soak"] = soak(url, proc.pid, args.clients, args.soak_seconds)
        print(json.dumps({k: v for k, v in out["soak"].items() if k != "rss_mb"}), flush=True)
        s = args.block_seconds
        blocks = [("alone", None), ("slowloris (300)", slowloris(port)),
                  ("stalled 10 MB bodies (20)", stalled_bodies(port)),
                  ("idle connections (1,124)", idle_flood(port)),
                  ("8.8 MB hostile bodies", hostile_body(url)),
                  ("clients leaving mid-body", leave_mid_body(port)),
                  ("malformed chunked bodies", bad_chunks(port)),
                  ("200 cancelled streams", cancelled_streams(url))]
        out["blocks"] = []
        for name, abuse in blocks:
            print(f"block: {name} ...", flush=True)
            out["blocks"].append(block(url, port, name, s, abuse))
            print(json.dumps(out["blocks"][-1]), flush=True)
            time.sleep(2)
        out["sigterm"] = sigterm(url, proc, log)
        print(json.dumps(out["sigterm"]), flush=True)
    finally:
        if proc.poll() is None:
            stop(proc)
    path = Path(args.out or ROOT / "runs" / f"serve-soak-{int(time.time())}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    alone = out["blocks"][0]
    print(f"\nsoak: {out['soak']['requests']:,} requests, statuses {out['soak']['codes']}, p50 "
          f"{out['soak']['p50']:.2f} s, p99 {out['soak']['p99']:.2f} s, RSS growth after minute 1 "
          f"{out['soak']['rss_growth_after_1min_mb']:+.1f} MB")
    print("| block | normal p50 / p99 (s) | p99 vs alone | normal failures | /health worst (s) "
          "| server statuses | abusive connections |")
    print("|---|---|---|---|---|---|---|")
    for b in out["blocks"]:
        print(f"| {b['block']} | {b['p50']:.2f} / {b['p99']:.2f} | {b['p99'] / alone['p99']:.2f}x | "
              f"{b['fails']} of {b['n'] + b['fails']} | {b['health_worst_s']:.2f} "
              f"({b['health_fails']} failed) | {b['statuses']} | {b['abusers']} |")
    print(f"SIGTERM: {out['sigterm']['outcomes']}, exit {out['sigterm']['exit_status']} after "
          f"{out['sigterm']['exit_after_s']:.1f} s, traceback in log: {out['sigterm']['traceback_in_log']}")
    print(f"results: {path}")


if __name__ == "__main__":
    main()

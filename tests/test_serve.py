"""megamesh serve: the engine, and live servers on 127.0.0.1 driven by the official SDKs.

A small model is trained for a few steps by `megamesh train` (a real subprocess) so the
server loads a real checkpoint and tokenizer. The SDK tests run against a uvicorn server
in a thread of this process (so a test can also look inside its engine); the limits and
authentication tests run `megamesh serve` as a subprocess.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time
from types import SimpleNamespace

import anthropic
import httpx
import jax
import openai
import pytest

from conftest import drive, wait_until
from megamesh.serve.engine import Engine, SamplingParams
from megamesh.serve.text import END, Detokenizer, StopMatcher, render_chat


def run_engine(eng: Engine, prompt: list[int], sampling: SamplingParams, tenant: str = ""):
    done, events = threading.Event(), []

    def emit(ev):
        events.append(ev)
        if ev.done:
            done.set()

    req = eng.submit(prompt, sampling, emit, tenant=tenant)
    assert done.wait(120)
    return req, "".join(e.text for e in events), events[-1]


def reference_greedy(eng: Engine, prompt: list[int], n: int) -> str:
    """The model's own greedy decode (model.generate), cut where the engine would stop."""
    from megamesh.model.generate import generate

    m = eng.model
    ids = generate(jax.device_get(m.params), m.cfg, prompt, n, stop_ids=m.eos_ids)
    ids = [t for t in ids if t not in m.eos_ids]
    return m.tokenizer.decode(ids).split(END)[0]


# ----------------------------------------------------------------------------- text pieces


def test_stop_matcher_holds_back_partial_stops():
    s = StopMatcher(["STOP"])
    assert s.push("abc ST") == ("abc ", None)
    out, hit = s.push("OP and more")
    assert out == "" and hit.text == "" and hit.reason == "stop_sequence" and hit.sequence == "STOP"
    s = StopMatcher(["xy"])
    assert s.push("ax") == ("a", None)
    assert s.push("z") == ("xz", None)
    s = StopMatcher([])
    out, hit = s.push(f"done{END}tail")
    assert hit.text == "done" and hit.reason == "end_turn" and hit.sequence is None


def test_detokenizer_streams_multibyte_text_whole(run_dir):
    from megamesh.rundir import load_tokenizer

    tok = load_tokenizer(run_dir / "tokenizer.json")
    text = "déjà vu: 世界 ✓ naïve"
    ids = tok.encode(text).ids
    d = Detokenizer(tok, [])
    parts = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(parts) == text
    assert all("\ufffd" not in p for p in parts)


def test_chat_template():
    assert render_chat("be brief", [("user", "hi")]) == \
        f"<|system|>\nbe brief{END}\n<|user|>\nhi{END}\n<|assistant|>\n"
    assert render_chat(None, [("user", "hi"), ("assistant", "Sure, ")]) == \
        f"<|user|>\nhi{END}\n<|assistant|>\nSure, "


# ----------------------------------------------------------------------------- engine


def test_engine_greedy_equals_model_generate(engine):
    tok = engine.model.tokenizer
    for text in ("def load(path):", "import json\n\nclass Encoder", "x"):
        prompt = tok.encode(text).ids
        _, out, last = run_engine(engine, prompt, SamplingParams(max_tokens=24, temperature=0))
        assert out == reference_greedy(engine, prompt, 24)
        assert last.stop_reason in ("max_tokens", "end_turn")


def test_engine_seeded_sampling_is_reproducible(engine):
    prompt = engine.model.tokenizer.encode("for key in").ids
    s = SamplingParams(max_tokens=16, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    a = run_engine(engine, prompt, s)[0].out_ids
    assert a == run_engine(engine, prompt, s)[0].out_ids
    assert a != run_engine(engine, prompt, SamplingParams(max_tokens=16, temperature=1.0, seed=8))[0].out_ids


def test_busy_slots_are_compacted_and_decode_runs_the_smallest_batch(engine):
    """12 requests of different lengths at once (slots 16: decode batches 8 and 16). As the
    short ones finish, the long ones move down to the low rows and decode drops to 8 rows;
    every request's tokens equal its tokens when run alone."""
    assert engine.runner.batch_buckets == [8, 16]
    assert engine.compiled_all.wait(300)  # the 8-row variants compile after start-up
    tok = engine.model.tokenizer
    prompts = [tok.encode(f"def f{i}(x):").ids for i in range(12)]
    lengths = [4 + 3 * i for i in range(12)]  # the low slots finish first
    alone = [run_engine(engine, p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0].out_ids
             for p, n in zip(prompts, lengths)]
    moves, steps = engine.stats["slot_moves"], engine.stats["decode_steps_8"]
    with engine.paused():  # all 12 admitted together, whatever the threads' timing
        reqs = [engine.submit(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                              lambda ev: None) for p, n in zip(prompts, lengths)]
        drive(engine, reqs)
    assert [r.out_ids for r in reqs] == alone
    assert engine.stats["slot_moves"] > moves  # long requests moved into freed low rows
    assert engine.stats["decode_steps_8"] > steps  # and decode ran 8 rows, not 16
    assert engine.active == 0 and sorted(engine.scheduler.free) == list(range(16))


def test_kv_memory_is_paged_and_a_full_pool_preempts_without_changing_tokens(run_dir, engine):
    """A request holds KV pages for the positions it has (not --max-len), and when the pool
    runs out, the request admitted last is preempted and recomputed later: 8 requests that
    need ~56 pages share 32 (one full-length sequence's worth), every request's tokens equal
    its tokens when run alone, and every page comes back. With a growth reserve
    (--kv-reserve-tokens) admission waits instead: no preemption, the same tokens."""
    from megamesh.serve.engine import build_engine

    small = build_engine(str(run_dir), mesh="tensor=1", slots=8, max_len=512, dtype="float32",
                         kv_pages=32, reserve_tokens=0, log=lambda *_: None)
    small.start()
    try:
        tok = engine.model.tokenizer
        prompts = [tok.encode(f"def handler_{i}(request, *args, **kwargs):").ids for i in range(8)]
        sampling = SamplingParams(max_tokens=90, temperature=0, ignore_eos=True)
        held: list[int] = []
        alone = [run_engine(small, p, sampling)[0].out_ids for p in prompts]

        def emit(ev):
            held.append(small.pages_used)

        seen: list[int] = []
        one = threading.Event()
        small.submit(prompts[0], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
                     lambda ev: (seen.append(small.pages_used), ev.done and one.set()))
        assert one.wait(120)
        # pages for positions 0 .. n + 28 (the last token is never fed back), not max_len's 32
        assert max(seen) == -(-(len(prompts[0]) + 29) // 16) < 32
        with small.paused():  # the 8 together: they outgrow the pool whatever the timing
            reqs = [small.submit(p, sampling, emit) for p in prompts]
            drive(small, reqs)
        assert [r.out_ids for r in reqs] == alone
        assert small.stats["preempted"] > 0 and max(held) <= 32
        assert small.pages_used == 0 and small.active == 0
        # the same 8 with room for every running request's output held back from admission
        small.scheduler.reserve_tokens = 128
        preempted = small.stats["preempted"]
        with small.paused():
            reqs = [small.submit(p, sampling, emit) for p in prompts]
            drive(small, reqs)
        assert [r.out_ids for r in reqs] == alone
        assert small.stats["preempted"] == preempted and max(held) <= 32
    finally:
        small.stop()


def test_overlapped_steps_hand_over_the_same_tokens_one_step_later(run_dir, engine):
    """The engine's thread does not wait for a decode's tokens before dispatching the next
    decode (`step(flush=False)`): the next one is fed them on the device, and the host
    streams them while it runs. Under compaction (different lengths), preemption (a pool
    of 32 pages for 16 slots), seeded sampling and stop sequences, every request gets the tokens and
    stop reason it gets step by step; a request is never given a token past its end."""
    from megamesh.serve.engine import build_engine

    small = build_engine(str(run_dir), mesh="tensor=1", slots=16, max_len=512, dtype="float32",
                         kv_pages=32, reserve_tokens=0, log=lambda *_: None)
    small.start()
    small.pool.prefix_cache = False  # (the second pass would read the first's pages)
    try:
        assert small.compiled_all.wait(300)
        tok = engine.model.tokenizer
        prompts = [tok.encode(f"def handler_{i}(request, *args):").ids for i in range(10)]
        params = [SamplingParams(max_tokens=60 + 10 * i, temperature=0.0 if i % 2 else 0.9, seed=i,
                                 ignore_eos=i % 3 != 2, stop=("e",) if i % 4 == 1 else ())
                  for i in range(10)]

        def run(flush):
            events = {i: [] for i in range(10)}
            with small.paused():
                reqs = [small.submit(p, s, events[i].append) for i, (p, s) in enumerate(zip(prompts, params))]
                for _ in range(5000):
                    if all(r.done for r in reqs):
                        break
                    small.step(flush=flush)
            last = [ev[-1] for ev in events.values()]
            assert all(ev.done for ev in last) and all(sum(e.done for e in ev) == 1 for ev in events.values())
            return [r.out_ids for r in reqs], [(e.stop_reason, e.output_tokens) for e in last]

        fed, preempted = small.stats["decode_steps_fed_on_device"], small.stats["preempted"]
        step_by_step = run(flush=True)
        assert small.stats["decode_steps_fed_on_device"] == fed
        overlapped = run(flush=False)
        assert overlapped == step_by_step
        assert small.stats["decode_steps_fed_on_device"] > fed + 50
        assert small.stats["preempted"] > preempted and small.stats["slot_moves"] > 0
        assert {reason for reason, _ in step_by_step[1]} >= {"max_tokens", "stop_sequence"}, [
            tok.decode(o) for o in step_by_step[0]]
        assert small.pages_used == 0 and small.active == 0 and small._inflight is None
    finally:
        small.stop()


def test_bf16_kv_pages_hold_twice_the_positions_in_the_same_memory(run_dir, engine):
    """--kv-dtype bfloat16 under float32 weights: pages of half the bytes, and the engine
    serves with them (greedy tokens may differ from f32 pages in the last places)."""
    from megamesh.serve.engine import build_engine

    small = build_engine(str(run_dir), mesh="tensor=1", slots=8, max_len=256, dtype="float32",
                         kv_dtype="bfloat16", log=lambda *_: None)
    small.start()
    try:
        assert small.kv_dtype == "bfloat16" and small.dtype == "float32"
        f32_bytes = sum(x.size * 4 for x in jax.tree.leaves(small.runner.pages))
        assert small.kv_bytes * 2 == f32_bytes
        prompt = engine.model.tokenizer.encode("def load(path):").ids
        req, _, last = run_engine(small, prompt, SamplingParams(max_tokens=12, temperature=0,
                                                                ignore_eos=True))
        assert len(req.out_ids) == 12 and last.stop_reason == "max_tokens"
    finally:
        small.stop()


def test_one_tenant_flooding_does_not_delay_another(engine):
    """Fair scheduling: tenant "flood" submits 48 long requests at once (16 slots: 32 of
    them wait); tenant "b" then asks 6 short questions one after another. b's time to first
    token, in engine steps, stays within 2x of its time on an idle engine (with first-come
    admission it would wait for the flood: hundreds of steps), because b's requests are
    admitted first and a flood request is preempted for them. Counted in steps, not
    seconds: the step itself is slower with 16 rows than with 1 (bench/serve_fairness.py
    measures the wall-clock TTFT)."""
    tok = engine.model.tokenizer
    prompt = tok.encode("def main(argv):").ids

    def b_steps() -> list[int]:
        out = []
        for _ in range(6):
            req = engine.submit(prompt, SamplingParams(max_tokens=4, temperature=0), lambda ev: None,
                                tenant="b")
            drive(engine, [req])
            out.append(req.first_token_step - req.submitted_step)
        return out

    with engine.paused():  # the test runs the steps: counts that do not depend on timing
        idle = b_steps()
        flood = [engine.submit(tok.encode(f"class Flood{i}:").ids,
                               SamplingParams(max_tokens=150, temperature=0, ignore_eos=True),
                               lambda ev: None, tenant="flood") for i in range(48)]
        try:
            engine.step()
            assert engine.active == 16 and engine.waiting == 32  # every slot taken by the flood
            preempted = engine.stats["preempted_for_fairness"]
            busy = b_steps()
            assert engine.stats["preempted_for_fairness"] > preempted
            assert sorted(busy)[3] <= 2 * sorted(idle)[3], (idle, busy)
            assert sum(r.done for r in flood) < 16  # the flood's first 16 are still going
        finally:
            for r in flood:
                engine.cancel(r)
            drive(engine, flood)
        assert engine.active == 0 and engine.waiting == 0
        # the same with first-come admission (`--scheduling fcfs`): b waits for the flood
        engine.scheduler.scheduling = "fcfs"
        try:
            flood = [engine.submit(tok.encode(f"class Flood{i}:").ids,
                                   SamplingParams(max_tokens=150, temperature=0, ignore_eos=True),
                                   lambda ev: None, tenant="flood") for i in range(48)]
            engine.step()
            first_come = b_steps()  # the first waits behind every flood request before it
            assert first_come[0] > 10 * max(idle), (idle, first_come)
        finally:
            engine.scheduler.scheduling = "fair"
            for r in flood:
                engine.cancel(r)
            drive(engine, flood)
    assert engine.active == 0 and engine.waiting == 0


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(engine):
    """Chunked prefill: with 64 prompt tokens per step, a 420-token prompt arriving while 4
    streams decode is prefilled over 7 steps, and every one of those steps still gives
    each stream its next token (no step without decode: their TPOT does not jump while the
    prompt goes in). The long prompt's tokens equal those of an unchunked prefill."""
    tok = engine.model.tokenizer
    long_prompt = (tok.encode("import os\n" * 140).ids * 2)[:420]
    sampling = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine.pool.prefix_cache = False  # (the second run would find the first's pages)
    try:
        alone = run_engine(engine, long_prompt, sampling)[0].out_ids
    finally:
        engine.pool.prefix_cache = True
    steps: dict[int, list[int]] = {}  # request id -> the engine steps that gave it a token
    accept = engine._accept

    def logged(req, tok, *logprob):
        steps.setdefault(req.id, []).append(engine.steps)
        accept(req, tok, *logprob)

    engine._accept = logged
    chunks = engine.stats["prefill_chunks"]
    engine.max_prefill_tokens, engine.pool.prefix_cache = 64, False
    try:
        with engine.paused():
            runners = [engine.submit(tok.encode(f"def worker_{i}(queue):").ids,
                                     SamplingParams(max_tokens=80, temperature=0, ignore_eos=True),
                                     lambda ev: None) for i in range(4)]
            while min(r.n_out for r in runners) < 5:
                engine.step()
            req = engine.submit(long_prompt, sampling, lambda ev: None)
            drive(engine, [req])
            first = req.first_token_step
            drive(engine, runners)
    finally:
        engine.max_prefill_tokens, engine.pool.prefix_cache = 2048, True
        del engine._accept
    assert engine.stats["prefill_chunks"] - chunks == 6  # 7 chunks: 6 before the last
    assert req.out_ids == alone
    prefilling = range(first - 6, first + 1)
    for r in runners:  # a token at every step while the prompt was prefilled
        assert all(s in steps[r.id] for s in prefilling), (list(prefilling), steps[r.id])


def test_background_work_yields_to_interactive_requests(engine):
    """Batch requests (priority 1) fill every slot and queue; an interactive request is
    admitted first and at once (a batch request is preempted for it), and the batch work
    all finishes afterwards."""
    tok = engine.model.tokenizer
    with engine.paused():
        batch = [engine.submit(tok.encode(f"batch item {i}").ids,
                               SamplingParams(max_tokens=60, temperature=0, ignore_eos=True),
                               lambda ev: None, tenant="batch:k", priority=1) for i in range(24)]
        engine.step()
        assert engine.active == 16 and engine.waiting == 8
        req = engine.submit(tok.encode("interactive").ids, SamplingParams(max_tokens=4), lambda ev: None,
                            tenant="k")
        drive(engine, [req])
        assert req.first_token_step - req.submitted_step <= 2
        assert sum(r.done for r in batch) < 16  # it went ahead of queued batch work
        drive(engine, batch)
    assert all(len(r.out_ids) == 60 for r in batch)


def test_engine_refuses_what_does_not_fit(engine):
    from megamesh.serve.engine import TooLong

    with pytest.raises(TooLong, match="exceeds this server's context of 512"):
        engine.submit([1] * 500, SamplingParams(max_tokens=20), lambda ev: None)


def test_tensor_parallel_engine_gives_the_same_tokens(run_dir, engine):
    """data=2,tensor=4 over a model of 2 kv heads: the pages hold each kv head twice
    (`model.specs.held_kv_heads`), one per device of the tensor axis, instead of the whole
    cache on every device."""
    from megamesh.serve.engine import build_engine

    sharded = build_engine(str(run_dir), mesh="data=2,tensor=4", slots=8, max_len=256, dtype="float32",
                           log=lambda *_: None)
    assert len(sharded.mesh.devices.flat) == 8
    assert sharded.cfg.n_kv_heads == 2 and sharded.runner.decode_steps[8].kv_heads == 4
    for pages in jax.tree.leaves(sharded.runner.pages):
        assert pages.shape[2] == 2 * 4  # (key, value) of 4 held heads
        assert pages.addressable_shards[0].data.shape[2] == 2  # one head per device
    sharded.start()
    try:
        tok = engine.model.tokenizer
        for text in ("def load(path):", "class JSONDecodeError"):
            prompt = tok.encode(text).ids
            one = run_engine(engine, prompt, SamplingParams(max_tokens=20, temperature=0))[0].out_ids
            eight = run_engine(sharded, prompt, SamplingParams(max_tokens=20, temperature=0))[0].out_ids
            assert one == eight
    finally:
        sharded.stop()


def test_hugging_face_directory_serves_the_same_tokens(run_dir, engine, tmp_path):
    import shutil

    import numpy as np

    from megamesh.model import hf
    from megamesh.pytree import flatten
    from megamesh.serve.engine import build_engine

    m = engine.model
    flat = {k: np.asarray(v) for k, v in flatten(jax.device_get(m.params)).items()}
    hf_dir = hf.save_hf(m.cfg, flat, tmp_path / "hf")
    with pytest.raises(Exception, match="tokenizer.json"):
        build_engine(str(hf_dir), mesh="tensor=1", slots=2, max_len=128, dtype="float32")
    shutil.copy(run_dir / "tokenizer.json", hf_dir / "tokenizer.json")
    other = build_engine(str(hf_dir), mesh="tensor=1", slots=4, max_len=128, dtype="float32",
                         log=lambda *_: None)
    assert other.model.name == "hf" and other.model.cfg.d_model == m.cfg.d_model
    other.start()
    try:
        prompt = m.tokenizer.encode("def dump(obj):").ids
        greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)  # the export has no eos id
        a = run_engine(engine, prompt, greedy)[0].out_ids
        b = run_engine(other, prompt, greedy)[0].out_ids
        assert a == b
    finally:
        other.stop()


# ----------------------------------------------------------------------------- Anthropic SDK


# anthropic 2.x's messages.create has no sampling keywords: they travel in the body
GREEDY = {"extra_body": {"temperature": 0}}
CONVERSATION = dict(system="You write Python.", messages=[
    {"role": "user", "content": "Write a JSON encoder."},
    {"role": "assistant", "content": [{"type": "text", "text": "import json\n"}]}])


def test_messages_create_equals_greedy_decode(client, engine):
    msg = client.messages.create(model="tiny", max_tokens=24, **GREEDY, **CONVERSATION)
    prompt = engine.model.tokenizer.encode(render_chat(
        "You write Python.", [("user", "Write a JSON encoder."), ("assistant", "import json\n")])).ids
    assert msg.type == "message" and msg.role == "assistant" and msg.model == "tiny"
    assert msg.content[0].type == "text"
    assert msg.content[0].text == reference_greedy(engine, prompt, 24)
    assert msg.usage.input_tokens == len(prompt)
    assert msg.stop_reason in ("max_tokens", "end_turn")
    if msg.stop_reason == "max_tokens":
        assert msg.usage.output_tokens == 24
    assert msg._request_id.startswith("req_")


def test_messages_stream_text_and_events(client):
    plain = client.messages.create(model="tiny", max_tokens=20, **GREEDY, **CONVERSATION)
    with client.messages.stream(model="tiny", max_tokens=20, **GREEDY, **CONVERSATION) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == plain.content[0].text == final.content[0].text
    assert final.stop_reason == plain.stop_reason
    assert final.usage.output_tokens == plain.usage.output_tokens
    events = [e.type for e in client.messages.create(model="tiny", max_tokens=8, stream=True, **GREEDY,
                                                     **CONVERSATION)]
    assert events[:2] == ["message_start", "content_block_start"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(events[2:-3]) <= {"content_block_delta"}


def test_raw_sse_sequence_and_close(server):
    body = {"model": "tiny", "max_tokens": 6, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", server.url + "/v1/messages", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["request-id"].startswith("req_")
        raw = r.read().decode()
    blocks = [b for b in raw.split("\n\n") if b]
    names = [b.split("\n")[0].removeprefix("event: ") for b in blocks]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    for b in blocks:
        event, data = b.split("\n")
        assert json.loads(data.removeprefix("data: "))["type"] == event.removeprefix("event: ")
    delta = json.loads(blocks[-2].split("\n")[1][6:])
    assert delta["usage"]["output_tokens"] >= 1
    assert delta["delta"]["stop_reason"] in ("max_tokens", "end_turn")


def test_stop_sequence(client):
    no_eos = {"extra_body": {"temperature": 0, "ignore_eos": True}}
    free = client.messages.create(model="tiny", max_tokens=30, **no_eos, **CONVERSATION).content[0].text
    assert len(free) > 6
    stop = free[3:6]
    msg = client.messages.create(model="tiny", max_tokens=30, stop_sequences=[stop], **no_eos,
                                 **CONVERSATION)
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == stop
    assert msg.content[0].text == free[:free.index(stop)]


def test_count_tokens_models_health_metrics(client, server, engine):
    n = client.messages.count_tokens(model="tiny", **CONVERSATION).input_tokens
    assert n == len(engine.model.tokenizer.encode(render_chat(
        "You write Python.", [("user", "Write a JSON encoder."), ("assistant", "import json\n")])).ids)
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="test", max_retries=0)
    assert [m.id for m in oa.models.list().data] == ["tiny"]
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["slots"] == 16
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("megamesh_http_requests_total", "megamesh_output_tokens_total", "megamesh_queue_depth",
                 "megamesh_active_slots", "megamesh_time_to_first_token_seconds_bucket",
                 "megamesh_time_per_output_token_seconds_bucket"):
        assert name in metrics


def test_metrics_the_endpoint_picker_and_autoscaler_read(server, engine):
    """The Gateway API Inference Extension's model-server protocol: queued and running
    requests, KV cache use (0-1) and the cache's block size and blocks, under the names its
    endpoint picker reads by default (vLLM's), beside megamesh's own."""
    from prometheus_client.parser import text_string_to_metric_families

    tok = engine.model.tokenizer
    sampling = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    with engine.paused():
        running = engine.submit(tok.encode("def encode(obj):").ids, sampling, lambda ev: None)
        engine.step()
        waiting = engine.submit(tok.encode("class Queue:").ids, sampling, lambda ev: None)
        try:
            text = httpx.get(server.url + "/metrics").text
            used = engine.pages_used
        finally:
            engine.cancel(running)
            engine.cancel(waiting)
            drive(engine, [running, waiting])
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["vllm:num_requests_waiting"].value == 1 == samples["megamesh_queue_depth"].value
    assert samples["vllm:num_requests_running"].value == 1 == samples["megamesh_active_slots"].value
    assert used > 0 and samples["vllm:kv_cache_usage_perc"].value == pytest.approx(used / engine.kv_pages)
    info = samples["vllm:cache_config_info"].labels
    assert info == {"block_size": str(engine.page_size), "num_gpu_blocks": str(engine.kv_pages)}
    assert samples["vllm:lora_requests_info"].labels["max_lora"] == "0"


def test_a_max_tokens_past_the_context_ends_at_the_window(client, engine):
    """The Messages API accepts a prompt that fits with a max_tokens that does not (Claude
    Code asks 32,000-64,000) and ends the answer when the context window fills, with
    stop_reason model_context_window_exceeded (issue 32 point 1)."""
    prompt = [{"role": "user", "content": "import json"}]
    with client.messages.stream(model="tiny", max_tokens=64_000, messages=prompt,  # as Claude Code
                                extra_body={"temperature": 0, "ignore_eos": True}) as stream:
        msg = stream.get_final_message()
    assert msg.stop_reason == "model_context_window_exceeded"
    assert msg.usage.input_tokens + msg.usage.output_tokens == engine.max_len
    short = client.messages.create(model="tiny", max_tokens=3, messages=prompt,
                                   extra_body={"ignore_eos": True})
    assert short.stop_reason == "max_tokens"


@pytest.fixture(scope="module")
def long_server(run_dir):
    """The tiny model at a context of 16,384 tokens (trained at 512: extrapolated), one
    slot: room for Claude Code's tool schemas."""
    from megamesh.serve.api import create_app
    from megamesh.serve.engine import build_engine
    from megamesh.serve.server import start_in_thread

    eng = build_engine(str(run_dir), mesh="tensor=1", slots=1, max_len=16384, dtype="float32",
                       log=lambda *_: None)
    eng.start()
    running = start_in_thread(create_app(eng), log=lambda *_: None)
    yield running, eng
    running.stop()
    eng.stop()


def test_a_context_past_the_trained_length_is_honoured_and_said(long_server):
    """--max-len past the model's trained length (512 here) is not silently cut: the engine
    serves the longer context (positions past 512 extrapolated) and says so."""
    _, long = long_server
    assert long.max_len == 16384 and long.trained_len == 512 and long.extrapolated
    tok = long.model.tokenizer
    prompt = tok.encode("def f(): pass\n" * 100).ids  # past 512 positions with its output
    assert 512 < len(prompt) + 40 <= 16384
    req, _, last = run_engine(long, prompt, SamplingParams(max_tokens=40, temperature=0,
                                                            ignore_eos=True))
    assert last.stop_reason == "max_tokens" and req.n_out == 40


def test_several_model_ids_and_any_model(engine):
    """--alias: more ids the model answers to (the id Claude Code sends, say), listed by
    /v1/models; responses name the id the request used; an unknown id is a 404 naming the
    served ones. --any-model: any id is answered (a proxy's backend)."""
    from megamesh.serve.api import Settings, create_app
    from megamesh.serve.server import start_in_thread

    hello = [{"role": "user", "content": "hi"}]
    running = start_in_thread(create_app(engine, Settings(aliases=("house-model",))),
                              log=lambda *_: None)
    try:
        sdk = anthropic.Anthropic(base_url=running.url, api_key="k", max_retries=0)
        assert [m.id for m in sdk.models.list().data] == ["tiny", "house-model"]
        msg = sdk.messages.create(model="house-model", max_tokens=2, messages=hello)
        assert msg.model == "house-model"
        oa = openai.OpenAI(base_url=running.url + "/v1", api_key="k", max_retries=0)
        assert oa.chat.completions.create(model="house-model", max_tokens=2,
                                          messages=hello).model == "house-model"
        with pytest.raises(anthropic.NotFoundError, match="serves 'tiny', 'house-model'"):
            sdk.messages.create(model="other-model", max_tokens=2, messages=hello)
        # issue 27 point 4: an anthropic-beta this server does not know is a 400 naming it;
        # the betas Claude Code sends are known
        known = "claude-code-20250219,interleaved-thinking-2025-05-14"
        msg = sdk.messages.create(model="tiny", max_tokens=2, messages=hello,
                                  extra_headers={"anthropic-beta": known})
        assert msg.stop_reason in ("max_tokens", "end_turn")
        for call in (sdk.messages.create, sdk.messages.count_tokens):
            kw = {"max_tokens": 2} if call == sdk.messages.create else {}
            with pytest.raises(anthropic.BadRequestError, match="future-feature-2099-01-01"):
                call(model="tiny", messages=hello, **kw,
                     extra_headers={"anthropic-beta": known + ",future-feature-2099-01-01"})
    finally:
        running.stop()
    running = start_in_thread(create_app(engine, Settings(unknown_betas="ignore")), log=lambda *_: None)
    try:  # --unknown-betas ignore: accepted and counted
        sdk = anthropic.Anthropic(base_url=running.url, api_key="k", max_retries=0)
        sdk.messages.create(model="tiny", max_tokens=2, messages=hello,
                            extra_headers={"anthropic-beta": "future-feature-2099-01-01"})
        assert "megamesh_unknown_betas_total 1.0" in httpx.get(running.url + "/metrics").text
    finally:
        running.stop()
    running = start_in_thread(create_app(engine, Settings(any_model=True, max_output_tokens=3)),
                              log=lambda *_: None)
    try:
        sdk = anthropic.Anthropic(base_url=running.url, api_key="k", max_retries=0)
        assert sdk.messages.create(model="anything-at-all", max_tokens=2,
                                   messages=hello).model == "anything-at-all"
        capped = sdk.messages.create(model="m", max_tokens=50, messages=hello,  # --max-output-tokens
                                     extra_body={"ignore_eos": True})
        assert capped.usage.output_tokens == 3 and capped.stop_reason == "max_tokens"
        assert sdk.models.retrieve("anything-at-all").id == "anything-at-all"
    finally:
        running.stop()


def test_typed_errors(client, server):
    with pytest.raises(anthropic.BadRequestError, match="messages.0.role"):
        client.messages.create(model="tiny", max_tokens=5, messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        client.messages.create(model="tiny", max_tokens=-1, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.BadRequestError, match=r"prompt is too long: \d+ tokens > 511 maximum"):
        client.messages.create(model="tiny", max_tokens=5,
                               messages=[{"role": "user", "content": "def f(): pass\n" * 120}])
    with pytest.raises(anthropic.BadRequestError, match="'image' is not supported"):
        client.messages.create(model="tiny", max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}])
    with pytest.raises(anthropic.BadRequestError, match="temperature"):
        client.messages.create(model="tiny", max_tokens=5, extra_body={"temperature": 1.5},
                               messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.NotFoundError, match="not served here") as e:
        client.messages.create(model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert e.value.request_id.startswith("req_")
    assert e.value.body["error"]["type"] == "not_found_error"
    for raw, ctype in ((b"{not json", "application/json"), (b"[1, 2]", "application/json"),
                       (b'{"model": "tiny"}', "application/json")):
        r = httpx.post(server.url + "/v1/messages", content=raw, headers={"content-type": ctype})
        assert r.status_code == 400, raw
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert r.headers["request-id"] == r.json()["request_id"]
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_hostile_values_are_400s_that_touch_no_one_else(server, engine):
    """issue 15's isolation cases that the request core now refuses at the edge: top_k past
    int32 (it used to reach the engine and end every generation in flight), a lone UTF-16
    surrogate, JSON nested ~1,000 deep. Each is a 400 naming the problem, with a request-id."""
    url = server.url
    before = engine.stats["step_errors"]
    bodies = [
        ({"model": "tiny", "max_tokens": 3, "top_k": 2**31, "messages": [{"role": "user", "content": "x"}]},
         "top_k"),
        ({"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "\ud800"}]},
         "messages.0.content: the string holds a lone UTF-16 surrogate"),
    ]
    for body, needle in bodies:
        r = httpx.post(url + "/v1/messages", content=json.dumps(body).encode(),
                       headers={"content-type": "application/json"})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
        assert r.headers["request-id"] == r.json()["request_id"]
    deep = b'{"model": "tiny", "max_tokens": 3, "messages": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    r = httpx.post(url + "/v1/messages", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nests deeper than 64 levels" in r.json()["error"]["message"]
    chat = {"model": "tiny", "top_k": 2**40, "messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(url + "/v1/chat/completions", json=chat)
    assert r.status_code == 400 and "top_k" in r.json()["error"]["message"]
    assert engine.stats["step_errors"] == before  # nothing reached the engine


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(server, engine):
    """A prompt with more bytes than the context could hold at the tokenizer's longest token
    is a 400 without being tokenized (a 30 MB prompt used to stall every stream for ~38 s
    on the event loop); prompts are tokenized in a worker thread."""
    core_limit = engine.max_len * max(len(engine.model.tokenizer.decode([i], skip_special_tokens=False)
                                          .encode()) for i in range(engine.model.tokenizer.get_vocab_size()))
    big = "def f(): pass\n" * (core_limit // 14 + 10)
    body = {"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": big}]}
    for route in ("/v1/messages", "/v1/messages/count_tokens"):
        r = httpx.post(server.url + route, json=body if "count" not in route else
                       {k: v for k, v in body.items() if k != "max_tokens"})
        assert r.status_code == 400, r.text
        msg = r.json()["error"]["message"]
        assert f"more than the context of {engine.max_len:,} tokens" in msg and "bytes" in msg
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": "tiny", "messages": [{"role": "user", "content": big}]})
    assert r.status_code == 400 and "more than the context" in r.json()["error"]["message"]


def test_an_unhandled_error_is_a_500_with_request_id_and_counted(server, engine, monkeypatch):
    """What no handler catches is still a 500 in the API's error shape, with its request-id
    header, counted in megamesh_http_requests_total; the next request is served."""
    def count():
        text = httpx.get(server.url + "/metrics").text
        line = [x for x in text.splitlines() if x.startswith("megamesh_http_requests_total{")
                and 'route="/v1/messages"' in x and 'status="500"' in x]
        return float(line[0].split()[-1]) if line else 0.0

    before = count()

    def broken(*a, **k):
        raise RuntimeError("injected bug with internal detail")

    monkeypatch.setattr(engine, "check", broken)
    body = {"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(server.url + "/v1/messages", json=body)
    assert r.status_code == 500 and r.json()["error"]["type"] == "api_error"
    assert "internal detail" not in r.text  # internal exception text stays in the log
    assert r.headers["request-id"] == r.json()["request_id"] and r.json()["request_id"]
    assert count() == before + 1
    monkeypatch.undo()
    assert httpx.post(server.url + "/v1/messages", json=body).status_code == 200


def test_tokens_per_minute_per_key_are_429s_with_retry_after(engine):
    """--input-tpm / --output-tpm: each API key has its own per-minute budgets (a bucket
    refilled continuously); past it a 429 with retry-after; output counts max_tokens at
    admission and gives back what was not generated; one key's use never limits another's;
    a request larger than a whole minute's budget is a 400."""
    from megamesh.serve.api import Settings, create_app
    from megamesh.serve.server import start_in_thread

    running = start_in_thread(create_app(engine, Settings(input_tokens_per_minute=60,
                                                          output_tokens_per_minute=100)))
    try:
        url = running.url + "/v1/messages"
        body = {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "hello"}]}
        n_in = httpx.post(running.url + "/v1/messages/count_tokens",
                          json={"model": "tiny", "messages": body["messages"]}).json()["input_tokens"]
        rs = [httpx.post(url, json=body, headers={"x-api-key": "a"}) for _ in range(60 // n_in + 1)]
        codes = [r.status_code for r in rs]
        assert codes[:60 // n_in] == [200] * (60 // n_in) and codes[-1] == 429
        # the Messages API's rate-limit headers: what remains after each request
        h = rs[0].headers
        assert h["anthropic-ratelimit-input-tokens-limit"] == "60"
        assert int(h["anthropic-ratelimit-input-tokens-remaining"]) in range(60 - n_in, 60 - n_in + 2)
        assert h["anthropic-ratelimit-output-tokens-limit"] == "100"
        assert h["anthropic-ratelimit-input-tokens-reset"].endswith("Z")
        assert h["anthropic-ratelimit-tokens-limit"] == "60"  # input is the tighter one here
        assert "anthropic-ratelimit-input-tokens-remaining" in rs[-1].headers  # on the 429 too
        r = httpx.post(url, json=body, headers={"x-api-key": "a"})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert int(r.headers["retry-after"]) >= 1 and "tokens per minute" in r.json()["error"]["message"]
        assert httpx.post(url, json=body, headers={"x-api-key": "b"}).status_code == 200
        # output: 80 of 100 reserved and generated (ignore_eos), so the next 80 must wait
        long = {**body, "max_tokens": 80, "ignore_eos": True, "temperature": 0}
        assert httpx.post(url, json=long, headers={"x-api-key": "c"}).status_code == 200
        assert httpx.post(url, json=long, headers={"x-api-key": "c"}).status_code == 429
        r = httpx.post(url, json={**body, "max_tokens": 101}, headers={"x-api-key": "e"})
        assert r.status_code == 400 and "exceed the 100 output tokens per minute" in r.text
        assert "megamesh_rate_limited_total 3.0" in httpx.get(running.url + "/metrics").text
    finally:
        running.stop()
    # what is reserved but not generated is given back when the answer ends
    from megamesh.serve.core import Core, Generation, Prompt

    core = Core(engine, Settings(output_tokens_per_minute=100))
    reserved = core._check_token_rates("k", 5, 90)
    core.buckets["k"][1].take(reserved)
    with pytest.raises(Exception, match="retry in"):
        core._check_token_rates("k", 5, 90)
    done = SimpleNamespace(done=True)  # an engine request that already ended
    core.in_flight["k"] += 1
    core.finish(Generation(done, None, "k", Prompt([1] * 5), time.perf_counter(), n_out=10,
                           reserved=reserved))
    assert core._check_token_rates("k", 5, 90) == 90  # 100 - 90 + 80 given back


def test_prompt_caching_reports_usage_as_the_messages_api_does(run_dir, engine):
    """cache_control breakpoints over the engine's prefix cache, through the Anthropic SDK:
    the first request writes its breakpoint prefix (cache_creation_input_tokens), the same
    prefix again is read (cache_read_input_tokens) and its KV pages really are reused (the
    engine's count); a prefix below the minimum is never cached; without breakpoints all is
    input; streaming reports the same usage in message_start; the OpenAI route reports the
    reused tokens as prompt_tokens_details.cached_tokens; counts add up to the prompt."""
    from megamesh.serve.api import Settings, create_app
    from megamesh.serve.server import start_in_thread

    running = start_in_thread(create_app(engine, Settings(cache_min_tokens=64)))
    try:
        client = anthropic.Anthropic(base_url=running.url, api_key="t", max_retries=0)
        doc = " ".join(f"clause {i}: the tenant's policy, item {i * 7}." for i in range(12))
        system = [{"type": "text", "text": doc, "cache_control": {"type": "ephemeral"}}]

        def ask(question, system=system, **kw):
            return client.messages.create(model="tiny", max_tokens=3, system=system,
                                          messages=[{"role": "user", "content": question}], **kw)

        total = client.messages.count_tokens(model="tiny", system=system, messages=[
            {"role": "user", "content": "first?"}]).input_tokens
        hits = engine.stats["prefix_hit_tokens"]
        first = ask("first?").usage
        assert first.cache_read_input_tokens == 0 and first.cache_creation_input_tokens > 64
        assert first.input_tokens + first.cache_creation_input_tokens == total
        # the write by lifetime, as the Messages API breaks it down (a 5-minute breakpoint)
        assert first.cache_creation.ephemeral_5m_input_tokens == first.cache_creation_input_tokens
        assert first.cache_creation.ephemeral_1h_input_tokens == 0
        second = ask("second, a different question?").usage
        assert second.cache_creation_input_tokens == 0
        assert second.cache_read_input_tokens == first.cache_creation_input_tokens
        reused = engine.stats["prefix_hit_tokens"] - hits
        assert second.cache_read_input_tokens - 16 < reused  # the pages under the breakpoint
        with client.messages.stream(model="tiny", max_tokens=3, system=system,
                                    messages=[{"role": "user", "content": "third?"}]) as stream:
            start = None
            for event in stream:
                if event.type == "message_start":
                    start = event.message.usage
            assert start.cache_read_input_tokens == first.cache_creation_input_tokens
            assert stream.get_final_message().usage.cache_read_input_tokens == start.cache_read_input_tokens
        hour = [{"type": "text", "text": "Hourly. " + doc, "cache_control": {"type": "ephemeral",
                                                                          "ttl": "1h"}}]
        u = ask("first?", system=hour).usage
        assert u.cache_creation.ephemeral_1h_input_tokens == u.cache_creation_input_tokens > 64
        # max_tokens 0 pre-warms: the prompt is prefilled and cached, nothing generated
        other = [{"type": "text", "text": "Warm. " + doc, "cache_control": {"type": "ephemeral"}}]
        warm = client.messages.create(model="tiny", max_tokens=0, system=other,
                                      messages=[{"role": "user", "content": "first?"}])
        assert warm.stop_reason == "max_tokens" and warm.usage.output_tokens == 0
        assert warm.usage.cache_creation_input_tokens > 64
        after = ask("then?", system=other).usage
        assert after.cache_read_input_tokens == warm.usage.cache_creation_input_tokens
        # cache_control on a tool definition: the prefix through that tool is cached
        tool = {"name": "lookup", "description": doc, "input_schema": {"type": "object"},
                "cache_control": {"type": "ephemeral"}}
        t1 = client.messages.create(model="tiny", max_tokens=2, tools=[tool], tool_choice={"type": "none"},
                                    messages=[{"role": "user", "content": "first?"}]).usage
        t2 = client.messages.create(model="tiny", max_tokens=2, tools=[tool], tool_choice={"type": "none"},
                                    messages=[{"role": "user", "content": "second?"}]).usage
        assert t1.cache_creation_input_tokens > 64 and t1.cache_read_input_tokens == 0
        assert t2.cache_read_input_tokens == t1.cache_creation_input_tokens
        plain = ask("first?", system=doc).usage  # no breakpoint: all input
        assert plain.cache_read_input_tokens == plain.cache_creation_input_tokens == 0
        assert plain.input_tokens == total
        short = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
        for _ in range(2):  # below the minimum: never written, never read
            u = ask("x", system=short).usage
            assert u.cache_creation_input_tokens == u.cache_read_input_tokens == 0
        oa = openai.OpenAI(base_url=running.url + "/v1", api_key="t", max_retries=0)
        msgs = [{"role": "system", "content": doc}, {"role": "user", "content": "first?"}]
        r = oa.chat.completions.create(model="tiny", messages=msgs, max_tokens=2)
        assert r.usage.prompt_tokens_details.cached_tokens >= first.cache_creation_input_tokens - 16
    finally:
        running.stop()


WEATHER = {"name": "weather", "input_schema": {"type": "object", "properties": {
    "city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 14}},
    "required": ["city", "days"], "additionalProperties": False}}
SEARCH = {"name": "search", "input_schema": {"type": "object", "properties": {
    "q": {"type": "string", "maxLength": 8}}, "required": ["q"], "additionalProperties": False}}


def test_tool_use_through_the_anthropic_sdk(client):
    """Tools in the Messages API: with tool_choice any / tool the answer is a tool_use block
    whose input is valid for the tool's input_schema (constrained decoding: this model is
    random), stop_reason tool_use; streamed, input_json_delta events rebuild the same kind
    of input; the call and its tool_result go back in the next turn; auto may answer in
    text. The calls are greedy: sampled (the Messages API has no seed), the random model's
    parallel calls once ran past the 64 tokens (CI, 2026-12-06), and only ~90 fit after
    the 420-token prompt."""
    import jsonschema

    msgs = [{"role": "user", "content": "What is the weather in Paris this week?"}]
    for i in range(4):
        choice = {"type": "any"} if i % 2 else {"type": "tool", "name": "search"}
        m = client.messages.create(model="tiny", max_tokens=64, tools=[WEATHER, SEARCH], messages=msgs,
                                   tool_choice=choice, **GREEDY)
        assert m.stop_reason == "tool_use", m.content
        call = m.content[-1]
        assert call.type == "tool_use" and call.id.startswith("toolu_")
        for c in m.content:  # one call or several (parallel by default), each valid
            assert c.type == "tool_use"
            jsonschema.validate(c.input, {"weather": WEATHER, "search": SEARCH}[c.name]["input_schema"])
            assert i % 2 or c.name == "search"
        one = client.messages.create(model="tiny", max_tokens=64, tools=[WEATHER, SEARCH], messages=msgs,
                                     tool_choice={**choice, "disable_parallel_tool_use": True},
                                     **GREEDY)
        assert [c.type for c in one.content] == ["tool_use"] and one.stop_reason == "tool_use"
    with client.messages.stream(model="tiny", max_tokens=64, tools=[WEATHER], messages=msgs,
                                tool_choice={"type": "any"}, **GREEDY) as stream:
        kinds = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert "input_json_delta" in kinds and final.stop_reason == "tool_use"
    jsonschema.validate(final.content[-1].input, WEATHER["input_schema"])
    follow = client.messages.create(model="tiny", max_tokens=8, tools=[WEATHER], messages=[
        *msgs, {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name,
                                                  "input": call.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                      "content": "sunny, 21 C"}]}], tool_choice={"type": "none"})
    assert follow.content[0].type == "text" and follow.stop_reason in ("end_turn", "max_tokens")
    auto = client.messages.create(model="tiny", max_tokens=16, tools=[WEATHER], messages=msgs)
    assert auto.content and auto.stop_reason in ("end_turn", "max_tokens", "tool_use")


# a tool as Claude Code writes them (JSON Schema 2020-12, `propertyNames`): the grammar
# engine cannot enforce `propertyNames`, which used to make every request a 400
ENV_TOOL = {"name": "run", "description": "Run a command.", "input_schema": {
    "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
    "properties": {"command": {"type": "string", "maxLength": 40},
                   "env": {"type": "object", "propertyNames": {"pattern": "^[A-Z_]+$"},
                           "additionalProperties": {"type": "string", "maxLength": 8}}},
    "required": ["command", "env"], "additionalProperties": False}}


def test_schema_keywords_the_grammar_engine_lacks_are_checked_after_decoding():
    """Issue 32 point 3, the pieces: decoding enforces the schema less what llguidance
    does not implement (a property named like the keyword stays); the full schema is
    checked on the finished input with a JSON Schema validator."""
    from megamesh.serve.tools import Tool, check_input, enforceable

    enforced, dropped = enforceable(ENV_TOOL["input_schema"])
    assert dropped == ("propertyNames",)
    assert "propertyNames" not in enforced["properties"]["env"]
    assert enforced["properties"]["env"]["additionalProperties"] == {"type": "string", "maxLength": 8}
    odd = enforceable({"type": "object", "properties": {"propertyNames": {"type": "string"}}})
    assert odd[1] == () and "propertyNames" in odd[0]["properties"]
    tool = Tool("run", "", ENV_TOOL["input_schema"])
    assert check_input(tool, {"command": "ls", "env": {"HOME": "/"}}) is None
    assert "does not match" in check_input(tool, {"command": "ls", "env": {"home": "/"}})


def test_the_template_end_marker_may_follow_a_call_or_a_json_answer(engine):
    """A model trained on megamesh's chat template writes its end marker right after a
    call's JSON, often in one token with the JSON's last characters (`"}<|`): the grammar
    lets it follow a call or a JSON answer (the response ends there), nothing else."""
    from megamesh.serve import tools
    from megamesh.serve.text import END

    tok = engine.model.tokenizer
    found = tools.check_tools([{"name": "read_file", "input_schema": {
        "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}])
    call = tools.render_call("read_file", {"path": "setup.py"})
    for grammar, text in [(tools.grammar(found, "any"), call), (tools.grammar(found, "auto"), call),
                          (tools.json_grammar({"type": "object"}), '{"a":1}')]:
        for tail, ok in [("", True), (END, True), ("x", False), (END + "x", False)]:
            m = engine.matcher(grammar)
            consumed = m.try_consume_tokens(tok.encode(text + tail).ids)
            assert (consumed == len(tok.encode(text + tail).ids) and not m.is_error()) == ok, (text, tail)
            if ok:
                assert m.is_accepting()


def test_a_preface_and_several_calls_in_one_answer(engine):
    """Issue 27 point 4: under tool_choice auto an answer may say something, then call
    several tools back to back (any / tool: calls only; parallel off: one); a streamed
    answer is read into the same text and calls whatever its chunking (a "<tool_call>"
    inside an input's strings stays input, a text's other "<" keeps it text); both APIs
    turn it into a text block / content and one tool_use block / tool_calls entry per
    call, ending tool_use / tool_calls."""
    from megamesh.serve import anthropic as anth
    from megamesh.serve import openai as oa_route
    from megamesh.serve import tools

    tok = engine.model.tokenizer
    found = tools.check_tools([WEATHER, SEARCH])

    def accepts(grammar, text):
        m = engine.matcher(grammar)
        ids = tok.encode(text).ids
        return m.try_consume_tokens(ids) == len(ids) and not m.is_error() and m.is_accepting()

    first = tools.render_call("weather", {"city": "Oslo", "days": 2})
    second = tools.render_call("search", {"q": "a<b"})
    both = "Let me check both.\n" + first + second
    auto, any_, single = (tools.grammar(found, "auto"), tools.grammar(found, "any"),
                          tools.grammar(found, "auto", parallel=False))
    assert accepts(auto, both) and accepts(auto, first + second) and accepts(auto, "hi <b>there</b>")
    assert accepts(any_, first + second) and not accepts(any_, both)  # any: calls only
    assert accepts(single, "Sure.\n" + first) and not accepts(single, first + second)
    # a preface has no "<": text with another "<" first is text to the end, calls and all
    assert tools.parse("Hmm <b> " + first) == ("Hmm <b> " + first, [])
    prose, calls = tools.parse(both)
    assert prose == "Let me check both.\n" and [c.name for c in calls] == ["weather", "search"]
    assert json.loads(calls[1].args) == {"q": "a<b"}
    tricky = tools.render_call("search", {"q": "<tool_call>b\n{}"}) + first  # a trigger in a string
    assert [(c.name, json.loads(c.args)) for c in tools.parse(tricky)[1]] == [
        ("search", {"q": "<tool_call>b\n{}"}), ("weather", {"city": "Oslo", "days": 2})]
    for size in (1, 3, 7):  # streamed in pieces: the same pieces joined
        r, pieces = tools.CallReader(), []
        for i in range(0, len(both), size):
            pieces += r.push(both[i:i + size])
        pieces += r.flush()
        names = [s for k, s in pieces if k == "name"]
        assert names == ["weather", "search"]
        assert "".join(s for k, s in pieces if k == "text") == prose
    assert tools.parse("x < y and <b>") == ("x < y and <b>", [])
    blocks, stop = anth.content_of(both, "end_turn", calling=True)
    assert [b["type"] for b in blocks] == ["text", "tool_use", "tool_use"] and stop == "tool_use"
    assert blocks[2]["input"] == {"q": "a<b"}
    message, reason = oa_route.choice_message(both, "end_turn", calling=True)
    assert message["content"] == prose and reason == "tool_calls"
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["weather", "search"]
    cut, stop = anth.content_of(both[:-3], "max_tokens", calling=True)  # a call cut off: text
    assert [b["type"] for b in cut] == ["text"] and stop == "max_tokens"


def test_tool_input_schemas_are_closed_unless_they_say_otherwise(engine):
    """Issue 27 point 4: an object that lists its properties takes no others while decoding
    (xgrammar's strict mode, OpenAI's strict outputs), at any depth; a schema that says
    `additionalProperties` keeps its word, and an object with no properties stays open."""
    from megamesh.serve import tools

    tok = engine.model.tokenizer

    def accepts(schema, value):
        found = tools.check_tools([{"name": "t", "input_schema": schema}])
        text = tools.render_call("t", value)
        m = engine.matcher(tools.grammar(found, "any"))
        ids = tok.encode(text).ids
        return m.try_consume_tokens(ids) == len(ids) and not m.is_error() and m.is_accepting()

    listed = {"type": "object", "properties": {"path": {"type": "string"}, "opts": {
        "type": "array", "items": {"type": "object", "properties": {"k": {"type": "integer"}}}}}}
    # in the order the schema lists them (llguidance's order; keys sorted used to force "opts" first)
    assert accepts(listed, {"path": "a", "opts": [{"k": 1}]})
    assert not accepts(listed, {"path": "a", "more": 1})
    assert not accepts(listed, {"opts": [{"k": 1, "j": 2}]})  # nested: closed too
    assert accepts({**listed, "additionalProperties": True}, {"path": "a", "more": 1})
    assert accepts({"type": "object"}, {"anything": [1, 2]})
    assert tools.closed(listed)["properties"]["opts"]["items"]["additionalProperties"] is False


def test_a_tool_the_grammar_cannot_fully_enforce_is_called_not_refused(client, server):
    """The request is served (it used to be a 400 'Unimplemented keys'); the call's
    input follows every keyword but propertyNames by construction, and a break of that one
    is counted in megamesh_tool_input_invalid_total exactly when the validator finds it."""
    from megamesh.serve.tools import Tool, check_input

    def invalid() -> float:
        text = httpx.get(server.url + "/metrics").text
        return float(next(x for x in text.splitlines()
                          if x.startswith("megamesh_tool_input_invalid_total")).split()[-1])

    before = invalid()
    m = client.messages.create(model="tiny", max_tokens=96, tools=[ENV_TOOL],
                               tool_choice={"type": "tool", "name": "run"},
                               messages=[{"role": "user", "content": "list files"}],
                               extra_body={"temperature": 0})
    assert m.stop_reason in ("tool_use", "max_tokens"), m.content
    if m.stop_reason == "tool_use":
        call = m.content[-1]
        broken = check_input(Tool("run", "", ENV_TOOL["input_schema"]), call.input)
        assert len(call.input["command"]) <= 40
        assert all(len(v) <= 8 for v in call.input["env"].values())
        assert invalid() == before + (1 if broken else 0)


def test_tool_calls_and_structured_output_through_the_openai_sdk(server):
    """OpenAI tools: tool_choice required / a named function gives a tool call whose
    arguments are valid for its parameters (finish_reason tool_calls), also streamed; a
    role "tool" result goes back in the next turn; response_format json_schema gives
    content valid for the schema (constrained decoding over a random model)."""
    import jsonschema

    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="test", max_retries=0)
    fns = [{"type": "function", "function": {"name": t["name"], "parameters": t["input_schema"]}}
           for t in (WEATHER, SEARCH)]
    msgs = [{"role": "user", "content": "weather in Oslo?"}]
    r = oa.chat.completions.create(model="tiny", messages=msgs, tools=fns, tool_choice="required",
                                   max_tokens=64, seed=3)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.id.startswith("call_")
    params = {"weather": WEATHER, "search": SEARCH}[call.function.name]["input_schema"]
    jsonschema.validate(json.loads(call.function.arguments), params)
    # seeded: sampled from the random model, parallel calls can run on past any budget
    # (unseeded at 64 tokens it once ended with finish_reason "length", 2026-12-06)
    chunks = list(oa.chat.completions.create(
        model="tiny", messages=msgs, tools=fns, max_tokens=96, stream=True, seed=7,
        tool_choice={"type": "function", "function": {"name": "search"}}))
    args: dict[int, str] = {}
    for c in chunks:
        for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            args[d.index] = args.get(d.index, "") + (d.function.arguments or "")
    assert chunks[-1].choices[0].finish_reason == "tool_calls" and sorted(args) == list(range(len(args)))
    for a in args.values():
        jsonschema.validate(json.loads(a), SEARCH["input_schema"])
    single = oa.chat.completions.create(model="tiny", messages=msgs, tools=fns, tool_choice="required",
                                        max_tokens=64, parallel_tool_calls=False, seed=5)
    assert len(single.choices[0].message.tool_calls) == 1
    # the next turn carries the one call back: ~455 prompt tokens + its <= 64 fit the
    # 512-token context (parallel calls in the history once made 513, 2026-12-06 CI)
    one = single.choices[0].message
    follow = oa.chat.completions.create(model="tiny", max_tokens=4, tools=fns, messages=[
        *msgs, one.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": one.tool_calls[0].id, "content": "cold"}])
    assert follow.choices[0].message.content is not None
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    out = oa.chat.completions.create(model="tiny", messages=msgs, max_tokens=32, response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    assert out.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("route,extra,needle", [
    ("/v1/messages", {"frequency_penalty": 0.5}, "frequency_penalty: this field is not supported"),
    ("/v1/messages", {"container": "x"}, "container: this field is not supported"),
    ("/v1/messages", {"thinking": {"type": "enabled", "budget_tokens": 1024}},
     "`max_tokens` must be greater than `thinking.budget_tokens`"),
    ("/v1/messages", {"thinking": {"type": "sometimes"}}, "thinking.type: Input should be"),
    ("/v1/messages", {"output_config": {"effort": "extreme"}}, "output_config.effort: Input should"),
    ("/v1/messages", {"tool_choice": {"type": "any"}}, "tool_choice: 'any' needs tools"),
    ("/v1/messages", {"tools": [{"name": "t", "input_schema": {"type": "string"}}]},
     "tools.0.input_schema: must be a JSON schema of \"type\": \"object\""),
    ("/v1/messages", {"tools": [{"name": "t", "input_schema": {"type": "object"}}],
                      "tool_choice": {"type": "tool", "name": "u"}}, "tool_choice.name: 'u' is not one"),
    ("/v1/messages", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": "10m"}}]}]},
     "messages.0.content.0.cache_control.ttl: '10m' is not allowed"),
    ("/v1/messages", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "x", "cache_control": {"type": "persistent"}}]}]},
     "messages.0.content.0.cache_control: must be {\"type\": \"ephemeral\"}"),
    ("/v1/messages", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}] * 5}]},
     "cache_control: at most 4 blocks may carry it; this request has 5"),
    ("/v1/messages", {"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]}]},
     "content block type 'image' is not supported"),
    ("/v1/messages", {"messages": [{"role": "user", "content": "x", "name": "bob"}]},
     "messages.0.name: this field is not supported"),
    ("/v1/messages", {"tools": [{"name": "t", "input_schema": {"type": "object"},
                                 "cache_control": {"type": "persistent"}}]},
     "tools.0.cache_control: must be {\"type\": \"ephemeral\"}"),
    ("/v1/messages", {"metadata": {"user_id": "u1", "session": "s"}},
     "metadata.session: this field is not supported"),
    ("/v1/messages", {"metadata": {"user_id": "u" * 257}}, "metadata.user_id: String should have at most"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 9}, "top_logprobs: 9 is more than"),
    ("/v1/chat/completions", {"presence_penalty": 0.3}, "presence_penalty: penalties"),
    ("/v1/chat/completions", {"response_format": {"type": "grammar"}}, "this response format"),
    ("/v1/chat/completions", {"logit_bias": {"50": 5}}, "logit_bias"),
    ("/v1/chat/completions", {"functions": []}, "functions: this field is not supported"),
])
def test_unsupported_fields_are_refused_by_name(server, route, extra, needle):
    """Issue 15 point 7: what the server does not implement is a 400 naming it, never
    silently ignored; values that change nothing are accepted."""
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}], **extra}
    r = httpx.post(server.url + route, json=body)
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_the_batch_database_defaults_to_the_served_runs_directory(run_dir, tmp_path):
    from megamesh.cli.serve import default_batch_db

    assert default_batch_db(str(run_dir)) == str(run_dir / "megamesh-batches.db")
    assert default_batch_db(str(run_dir / "checkpoints")) == str(run_dir / "megamesh-batches.db")
    assert default_batch_db(str(tmp_path)) == "megamesh-batches.db"  # not a run: the working directory


def test_what_claude_code_sends_is_accepted(client):
    """Issue 32 point 2: a system message mid-conversation, thinking (adaptive, or enabled
    with a budget), output_config.effort, an earlier assistant turn's thinking block: all
    accepted (no thinking blocks come back: the model does not think); output_config.format
    is structured output."""
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "they greet", "signature": "c2ln"},
                    {"type": "text", "text": "hello"}]},
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "and now?"}]
    for thinking in ({"type": "adaptive"}, {"type": "enabled", "budget_tokens": 1024}):
        with client.messages.stream(model="tiny", max_tokens=2048, messages=messages,
                                    thinking=thinking, metadata={"user_id": "u1"},
                                    extra_body={"output_config": {"effort": "high"}}) as stream:
            msg = stream.get_final_message()
        assert msg.content and all(b.type == "text" for b in msg.content)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    out = client.messages.create(model="tiny", max_tokens=24, messages=messages[-1:], extra_body={
        "temperature": 0, "output_config": {"format": {"type": "json_schema", "schema": schema}}})
    import jsonschema

    jsonschema.validate(json.loads(out.content[0].text), schema)


def test_claude_codes_own_request_is_served(long_server):
    """The request Claude Code 2.1.328 sends by default (recorded from a real run,
    tests/data/claude_code: its 12 tools' schemas, thinking enabled with display omitted,
    context_management clear_thinking, its betas, three system blocks with cache_control,
    `?beta=true`), with short texts in place of its prompts: streamed to message_stop, the
    context_management report in message_delta."""
    from pathlib import Path

    rec = json.loads((Path(__file__).parent / "data" / "claude_code" / "request-2.1.328.json").read_text())
    tools = [{"name": t["name"], "description": "a tool", "input_schema": t["input_schema"],
              **({"defer_loading": t["defer_loading"]} if "defer_loading" in t else {})}
             for t in rec["tools"]]
    body = {**rec["request"], "model": "tiny", "tools": tools,
            "system": [{"type": "text", "text": f"system part {i}", **({"cache_control": b["cache_control"]}
                                                                      if b["cache_control"] else {})}
                       for i, b in enumerate(rec["system_blocks"])],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "say hi",
                                                       "cache_control": {"type": "ephemeral"}}]}],
            "metadata": {"user_id": json.dumps({"device_id": "d", "session_id": "s"})},
            "temperature": 0}
    body["max_tokens"] = 32000  # as recorded (past the window: cut there, if it gets that far)
    headers = {"anthropic-beta": ",".join(rec["anthropic_beta"]), "anthropic-version": "2023-06-01",
               "x-api-key": "k"}
    events = []
    with httpx.stream("POST", long_server[0].url + "/v1/messages?beta=true", json=body,
                      headers=headers, timeout=600) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["type"] == "message_stop"
    delta = next(e for e in events if e["type"] == "message_delta")
    assert delta["context_management"] == {"applied_edits": []}  # keep: "all" clears nothing


def test_context_management_clears_old_tool_results():
    """clear_tool_uses_20250919 past its trigger: all but the last `keep` results become
    the placeholder (never an excluded tool's), counted; the prompt shrinks."""
    from megamesh.serve.anthropic import AnthropicMessage
    from megamesh.serve.context_edits import PLACEHOLDER, clear_tool_uses, parse

    msgs = []
    for i, name in enumerate(["read", "read", "bash", "read"]):
        msgs += [AnthropicMessage(role="assistant", content=[{"type": "tool_use", "id": f"t{i}",
                                                              "name": name, "input": {"n": i}}]),
                 AnthropicMessage(role="user", content=[{"type": "tool_result", "tool_use_id": f"t{i}",
                                                         "content": "x" * 100}])]
    (edit,) = parse({"edits": [{"type": "clear_tool_uses_20250919", "keep": {"type": "tool_uses",
                                                                             "value": 1},
                                "exclude_tools": ["bash"], "clear_tool_inputs": True}]})
    cleared, n = clear_tool_uses(msgs, edit)
    assert n == 2  # t0 and t1 (t2 is bash, t3 is kept)
    results = [m.content[0]["content"] for m in cleared if m.role == "user"]
    assert results == [PLACEHOLDER, PLACEHOLDER, "x" * 100, "x" * 100]
    assert [m.content[0]["input"] for m in cleared if m.role == "assistant"] == [{}, {}, {"n": 2}, {"n": 3}]
    assert msgs[1].content[0]["content"] == "x" * 100  # the request itself is not changed
    with pytest.raises(Exception, match="context_management.edits.0.type"):
        parse({"edits": [{"type": "clear_everything"}]})


def test_fields_at_harmless_values_are_accepted(client, server):
    ok = client.messages.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": "x"}],
                                metadata={"user_id": "u1"}, service_tier="auto",
                                thinking={"type": "disabled"})
    assert ok.usage.output_tokens >= 1
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="test", max_retries=0)
    r = oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                   max_tokens=2, user="u1", logprobs=False, presence_penalty=0,
                                   frequency_penalty=0, response_format={"type": "text"})
    assert r.usage.completion_tokens >= 1


def test_engine_failure_is_a_500_and_the_server_lives_on(client, engine):
    def broken(*a, **k):
        raise RuntimeError("injected device failure")

    original = dict(engine.runner.prefill_steps)
    engine.runner.prefill_steps.update({b: broken for b in original})
    try:
        with pytest.raises(anthropic.InternalServerError):
            client.messages.create(model="tiny", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    finally:
        engine.runner.prefill_steps.update(original)
    assert client.messages.create(model="tiny", max_tokens=3,
                                  messages=[{"role": "user", "content": "x"}]).usage.output_tokens >= 1


# ----------------------------------------------------------------------------- OpenAI SDK


def test_openai_chat_completions(server, client):
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="test", max_retries=0)
    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": "Write a JSON encoder."}]
    r = oa.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    a = client.messages.create(model="tiny", max_tokens=16, **GREEDY, system="You write Python.",
                               messages=[{"role": "user", "content": "Write a JSON encoder."}])
    assert r.choices[0].message.content == a.content[0].text
    assert r.choices[0].finish_reason == {"max_tokens": "length", "end_turn": "stop"}[a.stop_reason]
    assert r.usage.prompt_tokens == a.usage.input_tokens
    chunks = list(oa.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                             stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # n choices: seeded, choice i draws from seed + i (reproducible, different), streamed the same
    many = oa.chat.completions.create(model="tiny", messages=messages, max_tokens=12, n=3, seed=7,
                                      temperature=1.0)
    assert [c.index for c in many.choices] == [0, 1, 2]
    texts = [c.message.content for c in many.choices]
    assert len(set(texts)) > 1
    again = oa.chat.completions.create(model="tiny", messages=messages, max_tokens=12, n=3, seed=7,
                                       temperature=1.0)
    assert [c.message.content for c in again.choices] == texts
    one = oa.chat.completions.create(model="tiny", messages=messages, max_tokens=12, seed=8, temperature=1.0)
    assert one.choices[0].message.content == texts[1]
    assert many.usage.prompt_tokens == r.usage.prompt_tokens and many.usage.completion_tokens >= 3
    streamed = list(oa.chat.completions.create(model="tiny", messages=messages, max_tokens=12, n=3,
                                               seed=7, temperature=1.0, stream=True))
    got = ["".join(c.choices[0].delta.content or "" for c in streamed
                   if c.choices and c.choices[0].index == i) for i in range(3)]
    assert got == texts
    with pytest.raises(openai.BadRequestError, match="n"):
        oa.chat.completions.create(model="tiny", messages=messages, max_tokens=16, n=17)


def test_openai_logprobs_are_the_models_own(server, engine):
    """Issue 27 point 4: OpenAI logprobs / top_logprobs through the official SDK: one entry
    per output token, its log-probability under the model (greedy: the top alternative,
    equal to the forward pass's log-softmax at that position), top_logprobs alternatives in
    order, the same streamed; more than the server computes, or top_logprobs without
    logprobs, is a 400; a server started without them says how to turn them on."""
    import numpy as np

    from megamesh.model.transformer import forward

    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="test", max_retries=0)
    messages = [{"role": "user", "content": "Write a JSON encoder."}]
    r = oa.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                   logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and content
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)  # greedy: the most likely
        assert e.token == e.top_logprobs[0].token and bytes(e.bytes).decode() == e.token
    assert "".join(e.token for e in content) == r.choices[0].message.content
    # the model's own: the forward pass over prompt + output scores the same
    tok = engine.model.tokenizer
    ids = tok.encode(render_chat(None, [("user", messages[0]["content"])])).ids
    gen = tok.encode(r.choices[0].message.content, add_special_tokens=False).ids
    seq = ids + gen
    logits = forward(jax.device_get(engine.params), jax.numpy.asarray([seq]),
                     jax.numpy.arange(len(seq))[None], cfg=engine.cfg).logits[0]
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    want = [float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(gen)]
    assert [e.logprob for e in content][:len(want)] == pytest.approx(want, abs=2e-3)
    chunks = list(oa.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                             temperature=0, logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = oa.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == r.choices[0].message.content
    for bad, field in (({"logprobs": True, "top_logprobs": 6}, "top_logprobs"),
                       ({"top_logprobs": 2}, "top_logprobs")):
        with pytest.raises(openai.BadRequestError, match=field):
            oa.chat.completions.create(model="tiny", messages=messages, max_tokens=2, **bad)


def test_openai_completions_continue_a_raw_prompt(server, engine):
    """Issue 27 point 4: the legacy /v1/completions through the official SDK: the prompt
    continued as is (no chat template), greedy equal to the model's own decode of its
    tokens, streamed the same, echo, token-id prompts, usage; what it cannot honour is a
    400 naming the field."""
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="test", max_retries=0)
    prompt = "def parse(text):\n    "
    r = oa.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    ids = engine.model.tokenizer.encode(prompt, add_special_tokens=False).ids
    assert r.object == "text_completion" and r.choices[0].text == reference_greedy(engine, ids, 12)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens <= 12
    assert r.choices[0].finish_reason in ("length", "stop")
    chunks = list(oa.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                        stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    echoed = oa.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + r.choices[0].text
    by_ids = oa.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    two = oa.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, n=2)
    assert [c.text for c in two.choices] == [r.choices[0].text] * 2 and two.choices[1].index == 1
    for bad, field in (({"n": 17}, "n"), ({"logprobs": 3}, "logprobs"), ({"suffix": "x"}, "suffix"),
                       ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [10**9]}, "prompt")):
        with pytest.raises(openai.BadRequestError, match=field):
            oa.completions.create(**{"model": "tiny", "prompt": prompt, "max_tokens": 4, **bad})


# ----------------------------------------------------------------------------- load and abuse


def test_64_concurrent_streams_each_equal_the_request_alone(server, engine):
    prompts = [f"def f{i}(x):\n    return x * {i}" for i in range(64)]

    def ask(p: str) -> str:
        c = anthropic.Anthropic(base_url=server.url, api_key="test", max_retries=0)
        with c.messages.stream(model="tiny", max_tokens=16, **GREEDY,
                               messages=[{"role": "user", "content": p}]) as s:
            return "".join(s.text_stream)

    with cf.ThreadPoolExecutor(64) as pool:
        together = list(pool.map(ask, prompts))
    alone = [ask(p) for p in prompts[::8]]
    assert alone == together[::8]
    tok = engine.model.tokenizer
    for p, got in list(zip(prompts, together))[1::8]:
        ids = tok.encode(render_chat(None, [("user", p)])).ids
        assert got == reference_greedy(engine, ids, 16)


def _twelve_leave(engine, leave) -> list:
    """12 clients at once that each leave their request early. The test runs the engine's
    steps: one, in which the 12 are admitted and each gets its first tokens (streaming
    clients leave when it arrives; the others' read timeout of 0.1 s ends their wait),
    then, once every client has gone and the server has cancelled its request in the
    engine (it notices a closed connection by itself), one that frees them. No outcome
    depends on timing: every request ends cancelled with at most that step's tokens."""
    with engine.paused(), cf.ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(leave) for _ in range(12)]
        wait_until(lambda: engine.waiting == 12, "12 requests in the engine's queue")
        reqs = list(engine.scheduler.waiting)
        engine.step()
        for f in futures:
            f.result(timeout=60)  # the client left (its assertions held)
        wait_until(lambda: all(r.cancelled or r.done for r in reqs), "the server cancels all 12")
        engine.step()
    assert all(r.done for r in reqs) and engine.active == 0 and engine.waiting == 0
    return reqs


def test_disconnected_streams_free_their_slots(server, engine):
    before = engine.stats["finished_cancelled"]
    tokens_before = engine.stats["output_tokens"]
    body = {"model": "tiny", "max_tokens": 470, "temperature": 0, "stream": True, "ignore_eos": True,
            "messages": [{"role": "user", "content": "import json"}]}

    def open_and_leave() -> None:
        with httpx.stream("POST", server.url + "/v1/messages", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if "content_block_delta" in line:
                    break  # leave mid-stream: the connection closes here
            else:
                raise AssertionError("the stream ended before its first text")

    reqs = _twelve_leave(engine, open_and_leave)
    # stopped after the step the clients read their first text in (its prefill's token and
    # one decode), not run to max_tokens
    assert engine.stats["finished_cancelled"] - before == 12
    assert all(r.n_out == 2 for r in reqs)
    assert engine.stats["output_tokens"] - tokens_before == 24


def test_disconnected_non_streamed_requests_free_their_slots(server, engine):
    """A non-streamed request whose client has gone is cancelled (the core looks at the
    connection every 0.1 s while it waits, tokens arriving or not), not run to max_tokens
    (a 900-token one used to hold its slot for 34 s): queued or running when the client
    leaves, it ends cancelled with at most the one step's tokens."""
    before = engine.stats["finished_cancelled"]
    tokens_before = engine.stats["output_tokens"]
    body = {"model": "tiny", "max_tokens": 470, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": "import json"}]}

    def ask_and_leave() -> None:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up: its connection closes
            httpx.post(server.url + "/v1/messages", json=body, timeout=httpx.Timeout(5, read=0.1))

    _twelve_leave(engine, ask_and_leave)
    assert engine.stats["finished_cancelled"] - before == 12
    assert engine.stats["output_tokens"] - tokens_before <= 24


def test_message_batches_survive_a_killed_server(run_dir, cli_server, tmp_path):
    """Message Batches through the Anthropic SDK against `megamesh serve` on a SQLite file:
    a batch of 12 (10 good, 2 invalid) is processed in the background; the server is
    killed (SIGKILL) with part of it done, and restarted on the same file: the batch goes
    on, ends, and its results hold every request once, those finished before the kill
    unchanged; an invalid request is an `errored` result, not a failed batch; list,
    cancel (results `canceled`), delete, and another key's batch is not found."""
    import sqlite3

    db = tmp_path / "batches.db"
    args = ("--model", run_dir, "--max-len", "512", "--dtype", "float32", "--slots", "4",
            "--batch-concurrency", "2", "--batch-db", db)
    server = cli_server(*args)
    client = anthropic.Anthropic(base_url=server.url, api_key="k", max_retries=0)
    good = [{"custom_id": f"q-{i}", "params": {
        "model": "tiny", "max_tokens": 40, "temperature": 0, "ignore_eos": True,
        "messages": [{"role": "user", "content": f"question {i}: def f{i}(x):"}]}} for i in range(10)]
    bad = [{"custom_id": "no-tokens", "params": {"model": "tiny", "max_tokens": -1,
                                                 "messages": [{"role": "user", "content": "x"}]}},
           {"custom_id": "streamed", "params": {"model": "tiny", "max_tokens": 5, "stream": True,
                                                "messages": [{"role": "user", "content": "x"}]}}]
    batch = client.messages.batches.create(requests=good[:5] + bad + good[5:])
    assert batch.processing_status == "in_progress" and batch.request_counts.processing == 12
    deadline = time.monotonic() + 120
    while client.messages.batches.retrieve(batch.id).request_counts.succeeded < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    server.proc.kill()  # mid-batch
    server.proc.wait()
    with sqlite3.connect(db) as con:
        before = dict(con.execute("SELECT custom_id, result FROM requests WHERE state = 'succeeded'"))
    assert 3 <= len(before) <= 10  # (all 10 when the kill came late: nothing left to resume)

    server = cli_server(*args)
    client = anthropic.Anthropic(base_url=server.url, api_key="k", max_retries=0)
    deadline = time.monotonic() + 180
    while (b := client.messages.batches.retrieve(batch.id)).processing_status != "ended":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert b.request_counts.succeeded == 10 and b.request_counts.errored == 2 and b.ended_at
    results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    assert sorted(results) == sorted(r["custom_id"] for r in good + bad)
    for cid, res in results.items():
        if cid in ("no-tokens", "streamed"):
            assert res.type == "errored" and res.error.error.type == "invalid_request_error"
        else:
            assert res.type == "succeeded" and res.message.usage.output_tokens == 40
            assert res.message.content[0].text
    for cid, raw in before.items():  # written before the kill: the same message, not run again
        msg = json.loads(raw)["message"]
        assert (msg["id"], msg["content"][0]["text"]) == (results[cid].message.id,
                                                          results[cid].message.content[0].text)
    assert batch.id in [x.id for x in client.messages.batches.list()]

    slow = client.messages.batches.create(requests=[{"custom_id": f"s-{i}", "params": {
        "model": "tiny", "max_tokens": 300, "ignore_eos": True,
        "messages": [{"role": "user", "content": f"long {i}"}]}} for i in range(8)])
    assert client.messages.batches.cancel(slow.id).processing_status in ("canceling", "ended")
    deadline = time.monotonic() + 120
    while (c := client.messages.batches.retrieve(slow.id)).processing_status != "ended":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # how many finished before the cancel arrived depends on timing; the rest are canceled
    counts = c.request_counts
    assert counts.canceled + counts.succeeded == 8 and counts.errored == 0 and c.cancel_initiated_at
    types = [r.result.type for r in client.messages.batches.results(slow.id)]
    assert sorted(types) == sorted(["canceled"] * counts.canceled + ["succeeded"] * counts.succeeded)

    other = anthropic.Anthropic(base_url=server.url, api_key="someone-else", max_retries=0)
    with pytest.raises(anthropic.NotFoundError):
        other.messages.batches.retrieve(batch.id)
    assert client.messages.batches.delete(batch.id).type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(batch.id)


def test_canceling_a_batch_stops_its_requests(server, engine, client):
    """A canceled batch's requests stop in the engine and end `canceled`. The engine is
    paused while the batch is created and canceled, so none can have finished first."""
    with engine.paused():
        batch = client.messages.batches.create(requests=[{"custom_id": f"c-{i}", "params": {
            "model": "tiny", "max_tokens": 300, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"long {i}"}]}} for i in range(8)])
        wait_until(lambda: engine.waiting == 8, "the batch's 8 requests in the engine")
        reqs = list(engine.scheduler.waiting)
        assert client.messages.batches.cancel(batch.id).processing_status == "canceling"
        wait_until(lambda: all(r.cancelled for r in reqs), "the batch worker cancels them")
        drive(engine, reqs)
    wait_until(lambda: client.messages.batches.retrieve(batch.id).processing_status == "ended",
               "the batch ends")
    b = client.messages.batches.retrieve(batch.id)
    assert b.request_counts.canceled == 8 and b.request_counts.succeeded == 0 and b.cancel_initiated_at
    assert [r.result.type for r in client.messages.batches.results(batch.id)] == ["canceled"] * 8


def test_cli_server_limits_and_auth(run_dir, cli_server):
    """`megamesh serve`'s keys and body cap (the queue and per-key limits, which need the
    engine held still: test_overload_and_per_key_limits_are_the_messages_api_errors)."""
    server = cli_server("--model", run_dir, "--max-len", "512", "--dtype", "float32", "--slots", "1",
                        "--max-queue", "1", "--max-concurrent-per-key", "1", "--max-body-mb", "0.01",
                        "--api-key", "k1", "--api-key", "k2", "--api-key", "k3")
    url, proc = server.url, server.proc
    sdk = {k: anthropic.Anthropic(base_url=url, api_key=k, max_retries=0) for k in ("k1", "k2", "k3")}
    hello = [{"role": "user", "content": "hello"}]
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0).messages.create(
            model="tiny", max_tokens=3, messages=hello)
    r = httpx.post(url + "/v1/messages", json={"model": "tiny", "max_tokens": 3, "messages": hello})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.ContentTooLargeError):
        sdk["k1"].messages.create(model="tiny", max_tokens=3,
                                  messages=[{"role": "user", "content": "x" * 20_000}])
    assert sdk["k1"].messages.create(model="tiny", max_tokens=3, messages=hello).usage.output_tokens >= 1

    assert proc.poll() is None  # none of that stopped the server


def test_overload_and_per_key_limits_are_the_messages_api_errors(engine):
    """The engine's bounded queue is a 529 overloaded_error with retry-after, a key's
    concurrency cap a 429 rate_limit_error. The engine is paused (nothing is admitted), so
    k1's request holds the only place in a queue of one whatever the timing."""
    from megamesh.serve.api import Settings, create_app
    from megamesh.serve.server import start_in_thread

    running = start_in_thread(create_app(engine, Settings(max_concurrent_per_key=1)))
    sdk = {k: anthropic.Anthropic(base_url=running.url, api_key=k, max_retries=0) for k in ("k1", "k2")}
    hello = [{"role": "user", "content": "hello"}]
    ask = lambda key: sdk[key].messages.create(model="tiny", max_tokens=3, messages=hello)
    queue = engine.max_queue
    try:
        with engine.paused(), cf.ThreadPoolExecutor(1) as pool:
            engine.scheduler.max_queue = 1
            first = pool.submit(ask, "k1")
            wait_until(lambda: engine.waiting == 1, "k1's request in the queue")
            with pytest.raises(anthropic.OverloadedError) as e:
                ask("k2")
            assert e.value.response.headers["retry-after"] == "1"
            assert e.value.body["error"]["type"] == "overloaded_error"
            with pytest.raises(anthropic.RateLimitError) as e:
                ask("k1")
            assert e.value.response.headers["retry-after"] == "1"
            engine.scheduler.max_queue = queue
            drive(engine, list(engine.scheduler.waiting))
            assert first.result(timeout=60).usage.output_tokens >= 1
    finally:
        engine.scheduler.max_queue = queue
        running.stop()


def test_serve_bad_arguments_are_clear_errors(tmp_path, capsys):
    from megamesh.cli import main

    assert main(["serve", "--model", str(tmp_path / "nothing"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "is not a directory" in err
    assert main(["serve", "--model", str(tmp_path), "--slots", "0"]) == 2
    assert "--slots 0 is not allowed" in capsys.readouterr().err
    for flag, value in (("--drain-seconds", "-1"), ("--header-timeout", "0"),
                        ("--body-min-rate", "0"), ("--max-connections", "-1")):
        assert main(["serve", "--model", str(tmp_path), flag, value]) == 2
        err = capsys.readouterr().err
        assert f"{flag} {float(value) if flag != '--max-connections' else int(value)}" in err \
            and "is not allowed" in err and "Traceback" not in err, err


def test_bench_client_measures_the_server(server, engine):
    """`megamesh bench serve`'s client against the running server: every request completes,
    exact output lengths (ignore_eos), vLLM-style metrics, goodput against SLOs."""
    from megamesh.loadgen import BenchConfig, format_summary, run_bench

    assert engine.compiled_all.wait(300)
    cfg = BenchConfig(url=server.url, num_prompts=8, input_len=16, output_len=8, max_concurrency=4,
                      goodput={"ttft": 60_000.0}, warmups=1)
    s = run_bench(cfg, engine.model.tokenizer)
    assert s["completed"] == 8 and s["failed"] == 0
    assert s["total_output_tokens"] == 8 * 8
    assert s["output_throughput"] > 0 and s["ttft_ms"]["p50"] > 0
    assert s["goodput"] == pytest.approx(s["request_throughput"])  # all within a 60 s TTFT
    text = format_summary(s)
    assert "successful requests:" in text and "goodput (req/s meeting SLOs):" in text
    assert s["input_lengths_exact"]  # prompts of exactly 16 tokens with the server's tokenizer
    # the enterprise mix: tenants' system prompts reused from the prefix cache, counted by
    # the engine (these prompts are below --cache-min-tokens: usage reports no cache read)
    cfg = BenchConfig(url=server.url, dataset="enterprise", tenants=2, system_len=64, input_min=8,
                      input_max=16, output_min=2, output_max=4, num_prompts=6, max_concurrency=1,
                      warmups=0)
    s = run_bench(cfg, engine.model.tokenizer)
    assert s["completed"] == 6 and s["prefix_cache_hit_rate"] == 0
    assert s["engine_prefix_hit_rate"] > 0.3  # 4+ of 6 requests reuse their tenant's 64 tokens
    assert s["kv_pages_used"]["pages"] > 0  # the gauges were read (a fast run may show 0 in use)
    assert s["preempted"] == 0  # one request at a time
    assert s["engine_seconds"]["prefill"] > 0 and s["engine_seconds"]["decode"] > 0
    assert "engine prefix hit rate:" in format_summary(s)


# int8 in the slow set (an engine build and its compiles, ~25 s): the same code path as fp8
@pytest.mark.parametrize("weights", [pytest.param("int8", marks=pytest.mark.slow), "fp8"])
def test_quantized_weights_serve_the_same_greedy_tokens(run_dir, engine, weights):
    """Issue 25 point 4: `--weights int8|fp8` quantizes every layer's matmul weights once
    at load (per output channel) and the engine serves from them: the layers' weights
    hold 1 byte per value (+ scales), the embedding and head stay; scored on the
    unquantized engine's own greedy continuations, the quantized weights pick the same
    next token at nearly every position, and their greedy decode follows the same tokens
    for most of it."""
    import jax.numpy as jnp
    import numpy as np

    from megamesh.model.quant import QuantizedWeight
    from megamesh.model.specs import quantized_weights
    from megamesh.model.transformer import forward
    from megamesh.pytree import flatten
    from megamesh.serve.engine import build_engine

    q = build_engine(str(run_dir), mesh="tensor=1", slots=8, max_len=512, dtype="float32",
                     weights=weights, log=lambda *_: None)
    q.start()
    try:
        flat = flatten(q.params)
        names = quantized_weights(q.cfg)
        assert names and all(isinstance(flat[n], QuantizedWeight) for n in names)
        want = "int8" if weights == "int8" else "float8_e4m3fn"
        assert {str(flat[n].values.dtype) for n in names} == {want}
        assert not isinstance(flat["embed"], QuantizedWeight)
        full = flatten(engine.params)
        saved = sum(full[n].nbytes - flat[n].nbytes for n in names)
        assert q.weight_bytes == engine.weight_bytes - saved
        assert saved > 0.7 * sum(full[n].nbytes for n in names)
        tok = engine.model.tokenizer
        prompts = [tok.encode(p).ids for p in ("def handler(request):", "The quick brown fox",
                                                "import numpy as np", "Once upon a time")]
        sampling = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        ref = [run_engine(engine, p, sampling)[0].out_ids for p in prompts]
        got = [run_engine(q, p, sampling)[0].out_ids for p in prompts]
        same = sum(a == b for r, g in zip(ref, got) for a, b in zip(r, g)) / sum(map(len, ref))
        seqs = [p + r for p, r in zip(prompts, ref)]
        n = max(map(len, seqs))
        toks = jnp.asarray([s + [0] * (n - len(s)) for s in seqs], jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), toks.shape)
        top1 = [np.asarray(jnp.argmax(forward(p, toks, pos, cfg=q.cfg).logits, -1))
                for p in (engine.params, q.params)]
        valid = np.asarray([[i < len(s) for i in range(n)] for s in seqs])
        # this fixture's model has trained 4 steps: its logits are nearly flat, so near-ties
        # flip under e4m3's 3 mantissa bits (int8 keeps 7); on the 300-step checkpoint
        # both agree on >= 95% (bench/quantized_serving.py, BENCHMARKS.md "FP8")
        assert (top1[0] == top1[1])[valid].mean() >= (0.95 if weights == "int8" else 0.9)
        assert same >= 0.5, same
    finally:
        q.stop()

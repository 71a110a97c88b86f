"""Constrained decoding engines for tool use, compared on this CPU: llguidance,
outlines-core and xgrammar, each guaranteeing JSON valid for a tool's input schema.

  python -m venv /tmp/g && /tmp/g/bin/pip install llguidance outlines-core xgrammar tokenizers
  /tmp/g/bin/python bench/grammar_engines.py --tokenizer runs/bench-tiny/tokenizer.json

For a tool-call schema ({"name": one of the tools, "input": the tool's input schema}) and
the tokenizer of a megamesh run (byte-level BPE): the time to compile the schema into the
engine's matcher for this vocabulary, then --walks random walks (each step draws a token
uniformly among those the mask allows, until the grammar accepts and allows the end of
sequence, at most 300 tokens; compact JSON, no free whitespace, in every engine): the time
per mask, and whether every finished walk is JSON
that the schema accepts (checked here: required keys, types, enums, bounds). Medians.
The dependency footprint is reported too: megamesh installs what it uses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"enum": ["get_weather", "search_orders"]},
        "input": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
                "units": {"enum": ["metric", "imperial"]},
                "include": {"type": "array", "items": {"enum": ["rain", "wind", "uv"]}, "maxItems": 3},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "input"],
    "additionalProperties": False,
}


def valid(doc: str) -> bool:
    try:
        x = json.loads(doc)
    except json.JSONDecodeError:
        return False
    if set(x) != {"name", "input"} or x["name"] not in ("get_weather", "search_orders"):
        return False
    i = x["input"]
    props = SCHEMA["properties"]["input"]["properties"]
    return (isinstance(i, dict) and {"city", "days"} <= set(i) <= set(props)
            and isinstance(i["city"], str) and len(i["city"]) <= 20
            and isinstance(i["days"], int) and 1 <= i["days"] <= 14
            and i.get("units", "metric") in ("metric", "imperial")
            and all(v in ("rain", "wind", "uv") for v in i.get("include", []))
            and len(i.get("include", [])) <= 3)


def token_bytes(tok_json: dict) -> list[bytes]:
    """Each token's bytes (GPT-2 byte-level BPE: invert its byte-to-character table)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    to_byte = {chr(c): b for b, c in zip(bs, cs)}
    vocab = tok_json["model"]["vocab"]
    out = [b""] * (max(vocab.values()) + 1)
    for s, i in vocab.items():
        out[i] = bytes(to_byte[ch] for ch in s) if all(ch in to_byte for ch in s) else s.encode()
    for a in tok_json.get("added_tokens", []):
        out[a["id"]] = a["content"].encode()
    return out


def walk(rng, allowed, advance, done, max_steps=300) -> tuple[list[int], list[float], bool]:
    toks, times = [], []
    for _ in range(max_steps):
        t0 = time.perf_counter()
        ids = allowed()
        times.append(time.perf_counter() - t0)
        if done(ids):
            return toks, times, True
        t = int(rng.choice(ids))
        toks.append(t)
        advance(t)
    return toks, times, False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--walks", type=int, default=20)
    args = ap.parse_args()
    tok_json = json.load(open(args.tokenizer))
    vocab_bytes = token_bytes(tok_json)
    V, eos = len(vocab_bytes), 0
    schema = json.dumps(SCHEMA)
    results = {}

    def decode(toks):
        return b"".join(vocab_bytes[t] for t in toks).decode("utf-8", "replace")

    def bits_to_ids(bits):
        return np.nonzero(np.unpackbits(bits.view(np.uint8), bitorder="little")[:V])[0]

    # --- llguidance
    import llguidance
    import llguidance.numpy as lnp

    t0 = time.perf_counter()
    lt = llguidance.LLTokenizer(json.dumps(tok_json), eos_token=eos)
    tok_s = time.perf_counter() - t0
    compile_s, walks = [], []
    for w in range(args.walks):
        t0 = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, {"whitespace_flexible": False})
        m = llguidance.LLMatcher(lt, grammar, log_level=0)
        compile_s.append(time.perf_counter() - t0)
        bits = lnp.allocate_token_bitmask(1, lt.vocab_size)

        def allowed(m=m, bits=bits):
            lnp.fill_next_token_bitmask(m, bits, 0)
            return bits_to_ids(bits[0])

        walks.append(walk(np.random.default_rng(w), allowed, lambda t, m=m: m.consume_token(t),
                          lambda ids, m=m: m.is_accepting() and (eos in ids or len(ids) == 0)))
    results["llguidance"] = (tok_s, compile_s, walks)

    # --- outlines-core
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    table: dict[bytes, list[int]] = {}
    for i, b in enumerate(vocab_bytes):
        if i != eos and b:
            table.setdefault(b, []).append(i)
    vocab = Vocabulary(eos, table)
    tok_s = time.perf_counter() - t0
    compile_s, walks = [], []
    for w in range(args.walks):
        t0 = time.perf_counter()
        index = Index(build_regex_from_schema(schema, whitespace_pattern=""), vocab)
        compile_s.append(time.perf_counter() - t0)
        g = Guide(index)
        state = {"ids": g.get_tokens()}

        def allowed(state=state):
            return np.asarray(state["ids"])

        def advance(t, g=g, state=state):
            state["ids"] = g.advance(t)

        walks.append(walk(np.random.default_rng(w), allowed, advance,
                          lambda ids, g=g: g.is_finished() or (eos in ids and len(ids) == 1)))
    results["outlines-core"] = (tok_s, compile_s, walks)

    # --- xgrammar
    try:
        import xgrammar as xg

        t0 = time.perf_counter()
        info = xg.TokenizerInfo(vocab_bytes, xg.VocabType.RAW, stop_token_ids=[eos])
        compiler = xg.GrammarCompiler(info, cache_enabled=False)
        tok_s = time.perf_counter() - t0
        compile_s, walks = [], []
        for w in range(args.walks):
            t0 = time.perf_counter()
            cg = compiler.compile_json_schema(schema, any_whitespace=False)
            compile_s.append(time.perf_counter() - t0)
            m = xg.GrammarMatcher(cg)
            bits = xg.allocate_token_bitmask(1, info.vocab_size).numpy()

            def allowed(m=m, bits=bits):
                import torch

                tb = torch.from_numpy(bits)
                m.fill_next_token_bitmask(tb)
                return bits_to_ids(tb.numpy()[0])

            walks.append(walk(np.random.default_rng(w), allowed, lambda t, m=m: m.accept_token(t),
                              lambda ids, m=m: m.is_terminated() or (eos in ids and len(ids) == 1)))
        results["xgrammar"] = (tok_s, compile_s, walks)
    except ImportError as e:
        print(f"xgrammar: not installed ({e})")

    print(f"tokenizer: {args.tokenizer} ({V} tokens); schema: a tool call of 2 tools; "
          f"{args.walks} random walks each")
    for name, (tok_s, compile_s, walks) in results.items():
        finished = [(t, ts) for t, ts, ok in walks if ok]
        per_mask = [x for _, ts in finished for x in ts]
        ok = sum(valid(decode(t)) for t, _ in finished)
        mask_us = statistics.median(per_mask) * 1e6
        print(f"{name:14s} tokenizer setup {tok_s * 1e3:7.1f} ms, schema compile median "
              f"{statistics.median(compile_s) * 1e3:8.2f} ms, mask median {mask_us:7.1f} us (p99 "
              f"{np.percentile(per_mask, 99) * 1e6:7.1f}), walks finished {len(finished)}/{len(walks)}, "
              f"valid for the schema {ok}/{len(finished)}")
        if finished:
            print(f"{'':14s} e.g. {decode(finished[0][0])[:150]}")


if __name__ == "__main__":
    main()

"""Writes tests/data/corpus/: the small, fixed training corpus the tests train on.

Generated once (seeded, pure Python) and committed, so the tests' data is the same on
every machine and Python version (they used to copy part of the running Python's
standard library). Python-like source with English docstrings and comments: enough
structure for a tiny model's loss to fall in a few steps and for a 512-token BPE.
Run `python tests/data/make_corpus.py` to regenerate; it writes the same bytes.
"""

import random
from pathlib import Path

NOUNS = ("batch", "buffer", "cache", "chunk", "config", "device", "event", "field", "file",
         "frame", "graph", "handle", "index", "item", "job", "key", "layer", "limit", "list",
         "mesh", "model", "node", "offset", "option", "packet", "path", "plan", "pool", "queue",
         "record", "request", "result", "row", "schema", "shard", "slot", "state", "step",
         "stream", "table", "task", "token", "value", "vector", "window", "worker")
VERBS = ("build", "check", "clear", "close", "copy", "count", "decode", "encode", "fetch",
         "find", "flush", "format", "load", "merge", "open", "parse", "read", "render",
         "reset", "resolve", "save", "scan", "send", "sort", "split", "start", "stop",
         "update", "write")
ADJS = ("active", "current", "empty", "final", "first", "full", "last", "local", "new",
        "next", "old", "open", "pending", "previous", "raw", "remote", "small", "valid")
WORDS = ("the", "a", "each", "every", "this", "that", "one", "no", "its", "our")


def sentence(r: random.Random) -> str:
    n, v, a = r.choice(NOUNS), r.choice(VERBS), r.choice(ADJS)
    forms = (f"{v.capitalize()} the {a} {n} and return it.",
             f"Return {r.choice(WORDS)} {a} {n} after {v}ing it.",
             f"If the {n} is {a}, {v} {r.choice(WORDS)} {r.choice(NOUNS)} first.",
             f"The {n} must be {a} before we {v} the {r.choice(NOUNS)}.")
    return r.choice(forms)


def function(r: random.Random) -> str:
    v, n, a = r.choice(VERBS), r.choice(NOUNS), r.choice(ADJS)
    args = r.sample(NOUNS, r.randint(1, 3))
    lines = [f"def {v}_{n}({', '.join(args)}):", f'    """{sentence(r)}"""']
    for _ in range(r.randint(2, 6)):
        x, y = r.choice(args), r.choice(NOUNS)
        kind = r.randint(0, 4)
        if kind == 0:
            lines.append(f"    # {sentence(r)}")
        elif kind == 1:
            lines += [f"    if {x} is None:", f"        {x} = {r.choice(VERBS)}_{y}()"]
        elif kind == 2:
            lines += [f"    for {y} in {x}:", f"        {a}_{y} = {y}.{r.choice(VERBS)}()"]
        elif kind == 3:
            lines.append(f"    {y} = {x}.{r.choice(VERBS)}({r.randint(0, 64)})")
        else:
            flag = r.choice(["True", "False", "None"])
            lines.append(f"    {x} = {r.choice(VERBS)}_{y}({x}, {r.choice(ADJS)}={flag})")
    lines.append(f"    return {r.choice(args)}")
    return "\n".join(lines) + "\n"


def module(r: random.Random, i: int) -> str:
    head = f'"""Module {i}: {sentence(r)}\n\n{sentence(r)} {sentence(r)}\n"""\n\n'
    return head + "\n\n".join(function(r) for _ in range(r.randint(30, 45)))


def main() -> None:
    out = Path(__file__).parent / "corpus"
    out.mkdir(exist_ok=True)
    r = random.Random(20261130)
    for i in range(12):
        (out / f"module_{i:02d}.txt").write_text(module(r, i))


if __name__ == "__main__":
    main()

"""A training run's directory, as `megamesh train` writes it and `megamesh serve` reads it.

    OUT/tokenizer.json          the BPE tokenizer (EOS separates documents)
    OUT/data/                   the packed corpus (train.data)
    OUT/checkpoints/<step>/     Orbax checkpoints (train.checkpoint)
    OUT/metrics.jsonl, OUT/tensorboard/, OUT/orbax.log
    OUT/megamesh-batches.db     `megamesh serve`'s Message Batches (its default --batch-db)
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

EOS = "<|endoftext|>"  # the end-of-text token: separates documents, ends generation
TOKENIZER = "tokenizer.json"
CHECKPOINTS = "checkpoints"


def load_tokenizer(path: str | Path):
    """A run's tokenizer (`tokenizers.Tokenizer`)."""
    return Tokenizer.from_file(str(path))


def run_dir(spec: str | Path) -> Path | None:
    """The training run directory `spec` names (OUT or OUT/checkpoints), if it is one."""
    p = Path(spec)
    for cand in (p, p.parent):
        if (cand / CHECKPOINTS).is_dir() and (cand / TOKENIZER).is_file():
            return cand
    return None

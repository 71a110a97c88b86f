"""Which tokenizer a corpus is cut with: a `tokenizer.json` file, a Hugging Face model
directory (its own `tokenizer.json`, e.g. Llama 3's), a megamesh training run or a prepared
dataset (the one it used), or none: then a byte-level BPE is trained on the documents.

A tokenizer is identified by the SHA-256 of its canonical JSON (`tokenizers`' own
serialization), recorded by prepared datasets and training runs: a run refuses data cut
with another tokenizer. The end-of-text id that separates packed documents (and ends
generation when serving) comes from the model's config (`eos_token_id`) when there is one,
else from `tokenizer_config.json`'s `eos_token`, else megamesh's own `<|endoftext|>`
(serving a Hugging Face directory stops at every EOS id its config lists, `hf_eos_ids`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megamesh.errors import ConfigError
from megamesh.rundir import EOS


@dataclass
class TokenizerInfo:
    tok: Any  # tokenizers.Tokenizer
    eos_id: int
    source: str  # where it came from, for messages and manifests

    @property
    def sha256(self) -> str:
        return tokenizer_sha256(self.tok)

    @property
    def vocab_size(self) -> int:
        return int(self.tok.get_vocab_size())

    def describe(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "eos_token": self.tok.id_to_token(self.eos_id), "source": self.source}


def tokenizer_sha256(tok: Any) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def _token_id(tok: Any, token: str, where: str) -> int:
    i = tok.token_to_id(token)
    if i is None:
        raise ConfigError(f"{where}: the end-of-text token {token!r} is not in the tokenizer's vocabulary")
    return int(i)


def hf_eos_ids(directory: Path) -> list[int]:
    """The EOS ids a Hugging Face model directory's config names (generation_config.json,
    else config.json; one id or a list)."""
    for f in ("generation_config.json", "config.json"):
        p = directory / f
        if p.is_file():
            e = json.loads(p.read_text()).get("eos_token_id")
            if e is not None:
                return [e] if isinstance(e, int) else list(e)
    return []


def hf_eos_id(directory: Path, tok: Any) -> int | None:
    """The id that ends documents for a Hugging Face model directory: the config's EOS
    (the first, when it lists several), else tokenizer_config.json's `eos_token`."""
    ids = hf_eos_ids(directory)
    if ids:
        return int(ids[0])
    p = directory / "tokenizer_config.json"
    if p.is_file():
        e = json.loads(p.read_text()).get("eos_token")
        if isinstance(e, dict):
            e = e.get("content")
        if isinstance(e, str) and tok.token_to_id(e) is not None:
            return int(tok.token_to_id(e))
    return None


def load_tokenizer_spec(spec: str, eos: str | None = None) -> TokenizerInfo:
    """A tokenizer named by a file or a directory (see the module's docstring); `eos`
    names the end-of-text token when the files do not say."""
    from tokenizers import Tokenizer

    p = Path(spec)
    if p.is_dir():
        if (p / "manifest.json").is_file():  # a prepared dataset
            from megamesh.data.shards import Prepared

            ds = Prepared(spec)
            return TokenizerInfo(Tokenizer.from_str(ds.tokenizer_json()), ds.eos_id,
                                 f"{spec} (prepared dataset)")
        f = p / "tokenizer.json"
        if not f.is_file():
            raise ConfigError(f"--tokenizer {spec!r} holds no tokenizer.json (a Hugging Face model "
                              "directory, a training run or a prepared dataset has one)")
        tok = Tokenizer.from_file(str(f))
        if (p / "data" / "corpus.json").is_file():  # a training run
            meta = json.loads((p / "data" / "corpus.json").read_text())
            return TokenizerInfo(tok, int(meta["eos_id"]), f"{spec} (training run)")
        eos_id = _token_id(tok, eos, spec) if eos else hf_eos_id(p, tok)
        if eos_id is None and tok.token_to_id(EOS) is not None:
            eos_id = int(tok.token_to_id(EOS))
        if eos_id is None:
            raise ConfigError(f"--tokenizer {spec!r}: its config names no eos_token_id and the "
                              f"vocabulary has no {EOS}; name the end-of-text token with --eos")
        return TokenizerInfo(tok, eos_id, spec)
    if p.is_file():
        try:
            tok = Tokenizer.from_file(str(p))
        except Exception as e:  # noqa: BLE001 -- tokenizers raises plain Exceptions for bad files
            raise ConfigError(f"--tokenizer {spec!r} is not a tokenizers JSON file ({e})") from None
        token = eos or EOS
        return TokenizerInfo(tok, _token_id(tok, token, spec), spec)
    raise ConfigError(f"--tokenizer {spec!r} does not exist")


def model_tokenizer(model: str | None) -> TokenizerInfo | None:
    """The tokenizer a `--model` came with: a Hugging Face directory's tokenizer.json."""
    if not model:
        return None
    p = Path(model)
    if p.is_dir() and (p / "config.json").is_file() and (p / "tokenizer.json").is_file():
        return load_tokenizer_spec(str(p))
    return None

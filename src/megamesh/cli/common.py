"""Argument helpers shared by the subcommands."""

from __future__ import annotations

import argparse

from megamesh.config import ModelConfig
from megamesh.errors import ConfigError
from megamesh.model.source import model_config
from megamesh.settings import parse_overrides


def add_model_args(p: argparse.ArgumentParser, default: str | None = "tiny") -> None:
    p.add_argument("--model", default=default, required=default is None,
                   help="preset name, config file (.json/.yaml) or Hugging Face directory "
                   f"(default: {default}); override fields with --model.FIELD=VALUE")


def split_overrides(extra: list[str], allowed_prefixes: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Sort `--model.x=1 --train.lr=3e-4` into {"model": {...}, "train": {...}}; anything else is an error."""
    out: dict[str, dict[str, str]] = {p: {} for p in allowed_prefixes}
    for item in extra:
        head = item.lstrip("-").split(".", 1)[0]
        if not item.startswith("--") or head not in allowed_prefixes or "." not in item:
            allowed = " ".join(f"--{p}.KEY=VALUE" for p in allowed_prefixes)
            raise ConfigError(f"unrecognized argument {item!r}: overrides look like {allowed}")
        out[head].update(parse_overrides([item], prefix=head))
    return out


def key_values(text: str) -> dict[str, str]:
    """`islands=4,inner_steps=100` as {"islands": "4", "inner_steps": "100"} (a flag's
    comma-separated settings; a part without `=` is an error)."""
    return parse_overrides([x.strip() for x in text.split(",") if x.strip()])


def parse_diloco(text: str, *, islands_required: bool = True) -> tuple[int | None, int | None]:
    """`--diloco islands=N,inner_steps=H` as (N, H), the one grammar of every verb (plan,
    train, launch); either may be left out where the verb has a default for it."""
    if text.strip().isdigit():
        raise ConfigError(f"--diloco {text} is not allowed: write islands=N,inner_steps=H (a bare "
                          f"number was launch's old spelling: --diloco inner_steps={text.strip()})")
    opts = key_values(text)
    unknown = sorted(set(opts) - {"islands", "inner_steps"})
    if unknown or (islands_required and "islands" not in opts):
        need = "islands=N[,inner_steps=H]" if islands_required else "[islands=N,]inner_steps=H"
        raise ConfigError(f"--diloco {text!r} is not allowed: write {need}")
    try:
        vals = {k: int(v) for k, v in opts.items()}
    except ValueError:
        raise ConfigError(f"--diloco {text!r}: islands and inner_steps are integers") from None
    bad = [k for k, v in vals.items() if v < 1]
    if bad:
        raise ConfigError(f"--diloco {text!r}: {bad[0]} is not allowed: at least 1")
    return vals.get("islands"), vals.get("inner_steps")


def resolve_model(args: argparse.Namespace, extra: list[str]) -> ModelConfig:
    overrides = split_overrides(extra, ("model",))["model"]
    return model_config(args.model, overrides)

"""Logical axes -> mesh axes, as pure data and arithmetic (no jax).

Strategies (small ordered rule sets) and the resolution of an array's logical axes to
mesh axes live here so that the planner (which never imports jax) and the jax-side
sharding code (`sharding.rules`) use exactly the same rules. Resolution, per array:

- rules are applied in their order: an earlier rule claims its mesh axes first, so
  e.g. `expert` claims the expert mesh axis before `batch` can, and an activation's
  `batch` claims `fsdp` before its `embed` can;
- a mesh axis is used at most once per array; size-1 mesh axes are skipped;
- a mesh axis that does not divide the dimension is skipped (that dimension stays
  replicated over it), so any model runs on any mesh.

The mesh axes: dcn (across slices/pods), stage (pipeline stages: each holds a share of
every layer stack, `model.pipeline`), data, fsdp, sequence, tensor, expert.

The train step's rules are its strategy's, except that under fsdp with a small
microbatch the embedding table and output head are split on vocab rather than gathered
(`train_rules`, `vocab_parallel`). The planner's memory model is unaffected (a table's
share per device is 1/fsdp either way); its communication model still counts the tables
as FSDP gathers, an overestimate only for such small microbatches, which pod-scale plans
do not have.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from megamesh.errors import ConfigError

MESH_AXES = ("dcn", "stage", "data", "fsdp", "sequence", "tensor", "expert")
LOGICAL_AXES = ("expert", "batch", "seq", "heads", "kv_heads", "mlp", "vocab",
                "embed", "head_dim", "layers", "norm", "router", "stage")

Rules = tuple[tuple[str, tuple[str, ...]], ...]

# The mesh axes that carry the batch (the data-parallel axes) in training; serving keeps
# `expert` for the experts alone. Read them with `batch_axes(strategy)`.
BATCH_AXES = ("dcn", "data", "fsdp", "expert")
# The mesh axes parameters are stored split over and all-gathered for compute (ZeRO-3):
# fsdp, and sequence (context parallelism), whose devices share the batch rows.
ZERO_AXES = ("fsdp", "sequence")

# Pipeline stages (training): a stack's layer axis is split over the stage axis (stage p
# holds a contiguous 1/P of the layers), and so is the stage axis of the pipeline's own
# buffers (`model.transformer`'s pipelined stacks). Everything else ignores `stage`: the
# embedding, the head and the loss run on every stage.
PIPELINE_RULES: Rules = (("stage", ("stage",)), ("layers", ("stage",)))

STRATEGIES: dict[str, Rules] = {
    # ZeRO-3 style: parameters sharded over fsdp and sequence on their embed dim (the
    # context-parallel devices hold different tokens of the same batch rows, so they
    # store a share of the weights and gather them like fsdp: MaxText's rules do the
    # same), tensor parallel on heads/mlp/vocab, experts over expert; the batch spread
    # over every data-like axis. Between layers the residual stream's embed dim is split
    # over tensor (what the batch and the sequence left free), so saved activations are
    # not replicated across a tensor group.
    "fsdp": PIPELINE_RULES + (
        ("expert", ("expert",)),
        ("batch", BATCH_AXES),
        ("seq", ("sequence",)),
        ("heads", ("tensor",)),
        ("kv_heads", ("tensor",)),
        ("mlp", ("tensor",)),
        ("vocab", ("tensor",)),
        ("embed", ZERO_AXES + ("tensor",)),
    ),
    # Pure data parallel: every parameter replicated, the batch split over all axes.
    "dp": PIPELINE_RULES + (
        ("batch", BATCH_AXES + ("tensor",)),
    ),
    # Serving: tensor and expert parallel weights (no fsdp gather per step); the batch
    # (decode slots) over data; the KV cache split by kv head.
    "serve": (
        ("expert", ("expert",)),
        ("batch", ("dcn", "data", "fsdp")),
        ("heads", ("tensor",)),
        ("kv_heads", ("tensor",)),
        ("mlp", ("tensor",)),
        ("vocab", ("tensor",)),
    ),
}


def strategy(name: str) -> Rules:
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}: allowed are {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def batch_axes(name: str) -> tuple[str, ...]:
    """The mesh axes strategy `name` splits the batch over."""
    return dict(strategy(name))["batch"]


def vocab_parallel(rules: Rules) -> Rules:
    """`rules` with the vocab dimension also split over fsdp, claimed before any other.

    Plain FSDP stores the embedding table and the output head (vocab x d_model each) split
    on d_model and all-gathers them whole for every microbatch, and their gradients come
    back as large. Split on vocab instead, and left split for compute
    (`weight_compute_rules`), the tables never move: every device looks up and scores the
    whole fsdp group's microbatch against its own slice of the vocabulary, so what crosses
    devices is the microbatch's activations (tokens x d_model: gathered for the head,
    reduced after the lookup) and the softmax's per-token max and sum. That is less
    traffic when the group's microbatch has fewer tokens than the vocabulary
    (`train_rules` decides): small batches, never at pod scale, where a microbatch holds
    millions of tokens.
    """
    vocab = tuple(dict(rules).get("vocab", ()))
    if "fsdp" not in vocab:
        vocab += ("fsdp",)
    return (("vocab", vocab),) + tuple(r for r in rules if r[0] != "vocab")


def weight_compute_rules(rules: Rules) -> Rules:
    """The rules for a weight in its compute layout: the ZeRO axes (fsdp, sequence)
    dropped (the weight is gathered whole for its matmul: ZeRO-3), except fsdp on vocab,
    which it keeps under `vocab_parallel`."""
    return tuple((name, tuple(m for m in axes if m not in ZERO_AXES
                              or (m == "fsdp" and name == "vocab")))
                 for name, axes in rules)


def train_rules(name: str, sizes: dict[str, int], *, vocab: int, global_batch: int,
                microbatches: int, seq_len: int) -> Rules:
    """The rules the train step uses: strategy `name`, made `vocab_parallel` when the
    tables would otherwise be gathered over fsdp and the fsdp group's microbatch has fewer
    tokens than the vocabulary (activations then move fewer bytes than the tables)."""
    rules = strategy(name)
    fsdp = sizes.get("fsdp", 1)
    if fsdp == 1 or "fsdp" not in dict(rules).get("embed", ()):
        return rules
    per_micro = global_batch // microbatches
    shards = math.prod(sizes[m] for m in resolve(("batch",), (per_micro,), sizes, rules)[0])
    group_tokens = per_micro // shards * fsdp * seq_len
    split = vocab_parallel(rules)
    if group_tokens >= vocab or "fsdp" not in resolve(("vocab",), (vocab,), sizes, split)[0]:
        return rules
    return split


def resolve(axes: Sequence[str | None], shape: Sequence[int], sizes: dict[str, int],
            rules: Rules) -> list[tuple[str, ...]]:
    """The mesh axes sharding each dimension (empty tuple: replicated)."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {tuple(axes)} do not match shape {tuple(shape)}")
    for a in axes:
        if a is not None and a not in LOGICAL_AXES:
            raise ValueError(f"unknown logical axis {a!r}: allowed are {', '.join(LOGICAL_AXES)}")
    order = {name: i for i, (name, _) in enumerate(rules)}
    mapping = dict(rules)
    used: set[str] = set()
    out: list[tuple[str, ...]] = [()] * len(axes)
    dims = sorted((i for i, a in enumerate(axes) if a in mapping), key=lambda i: order[axes[i]])
    for i in dims:
        chosen: list[str] = []
        size = 1
        for m in mapping[axes[i]]:  # type: ignore[index]
            n = sizes.get(m, 1)
            if n == 1 or m in used or shape[i] % (size * n):
                continue
            chosen.append(m)
            size *= n
        used.update(chosen)
        out[i] = tuple(chosen)
    return out


def parse_layout(layout: str | dict[str, int]) -> dict[str, int]:
    """`"data=2,fsdp=4"` -> {"data": 2, "fsdp": 4}; checks names and sizes."""
    if isinstance(layout, dict):
        items = list(layout.items())
    else:
        items = []
        for part in filter(None, (p.strip() for p in layout.split(","))):
            name, sep, value = part.partition("=")
            if not sep:
                raise ConfigError(f"layout part {part!r} is not allowed: must look like axis=size "
                                  f"(axes: {', '.join(MESH_AXES)})")
            try:
                size = int(value)
            except ValueError:
                raise ConfigError(f"layout {name.strip()}={value!r} is not allowed: the size must "
                                  "be a positive integer") from None
            items.append((name.strip(), size))
    out: dict[str, int] = {}
    for name, size in items:
        if name not in MESH_AXES:
            raise ConfigError(f"unknown mesh axis {name!r} in layout: allowed are {', '.join(MESH_AXES)}")
        if name in out:
            raise ConfigError(f"mesh axis {name!r} appears twice in the layout")
        if not isinstance(size, int) or size < 1:
            raise ConfigError(f"layout {name}={size!r} is not allowed: must be a positive integer")
        out[name] = size
    return out


def format_layout(sizes: dict[str, int]) -> str:
    return ",".join(f"{a}={sizes[a]}" for a in MESH_AXES if sizes.get(a, 1) > 1) or "data=1"


def split_over_slices(shape: Sequence[int], slice_devices: int) -> tuple[list[int], list[int]]:
    """(ICI part, DCN part) of each axis of a mesh `shape` on slices of `slice_devices`.

    The inner axes fill a slice first (the last axis fastest); an outer axis spills across
    slices only once the slice is full, so e.g. `dcn=2,fsdp=256` on two 256-device
    slices puts dcn across them, and `fsdp=512` puts the fsdp axis itself across them
    (FSDP over DCN, as MaxText's dcn_fsdp_parallelism).
    """
    room = slice_devices
    ici, dcn = [1] * len(shape), [1] * len(shape)
    for i in reversed(range(len(shape))):
        n = shape[i]
        ici[i] = math.gcd(n, room)
        dcn[i] = n // ici[i]
        room //= ici[i]
        if dcn[i] > 1 and room > 1:
            raise ConfigError(f"layout {format_layout(dict(zip(MESH_AXES, shape)))} cannot be split "
                              f"into slices of {slice_devices} devices: axis {MESH_AXES[i]}={n} "
                              f"spills across slices before a slice is full")
    return ici, dcn

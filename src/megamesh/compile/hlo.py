"""Reading a compiled step: matmul FLOPs from its jaxpr, collectives from its optimized HLO.

XLA's own cost analysis counts the body of a while loop once, so for a step whose layers
are a `scan` it undercounts by the layer count. The exact count comes from the jaxpr
(every dot_general and ragged_dot, times the trip counts of the scans around it); with
trip counts ignored the same walk reproduces XLA's convention, which checks one against
the other. A Pallas kernel (splash attention) is opaque to XLA's cost analysis, so the
XLA-convention walk leaves it out; the exact walk counts its body's dots once per block
of its grid that runs: for splash the blocks on and below the causal diagonal, nb (nb +
1) / 2 of nb^2 (it skips the blocks above; the diagonal ones run whole). A `shard_map`
body (the per-device kernels) counts once per device of its mesh, a `cond` (switch) as
the mean of its branches (splash's context-parallel offsets: one branch per device).

Collectives are read from the optimized per-device HLO: kind, count (times the trip
count of the while loops they sit in, read from the loop condition's bound) and bytes.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def dot_flops(jaxpr: Any, *, trip_counts: bool = True, in_kernel: bool = False) -> float:
    """FLOPs of all dot_generals (and ragged_dots, Pallas kernels' dots) in a (closed)
    jaxpr, 2 per multiply-add. A cond counts as the mean of its branches (a switch on
    the device's position runs a different branch per device), inside a kernel body
    (`in_kernel`) as its largest (`pl.when` skipping a block: the block runs)."""
    from jax.extend.core import ClosedJaxpr, Jaxpr

    total = 0.0
    j = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
    for eqn in j.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            contract = math.prod(lhs[d] for d in lc)
            batch = math.prod(lhs[d] for d in lb)
            free_l = math.prod(lhs) // (contract * batch)
            free_r = math.prod(rhs) // (contract * batch)
            total += 2.0 * batch * free_l * free_r * contract
            continue
        if name == "ragged_dot_general":  # each lhs element meets rhs's free dims once
            dn = eqn.params["ragged_dot_dimension_numbers"]
            (_, rc), (_, rb) = dn.dot_dimension_numbers
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            skip = set(rc) | set(rb) | set(dn.rhs_group_dimensions)
            total += 2.0 * math.prod(lhs) * math.prod(d for i, d in enumerate(rhs) if i not in skip)
            continue
        if name == "pallas_call":
            if trip_counts:
                total += _pallas_flops(eqn)
            continue
        if name == "cond":
            counts = [dot_flops(b, trip_counts=trip_counts, in_kernel=in_kernel)
                      for b in eqn.params["branches"]]
            total += max(counts) if in_kernel else sum(counts) / len(counts)
            continue
        mult = eqn.params.get("length", 1) if name == "scan" and trip_counts else 1
        if name == "shard_map":  # the body's shapes are one device's: it runs on every device
            mult = eqn.params["mesh"].size
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                if isinstance(sub, (ClosedJaxpr, Jaxpr)):
                    total += mult * dot_flops(sub, trip_counts=trip_counts, in_kernel=in_kernel)
    return total


def _pallas_flops(eqn: Any) -> float:
    """A Pallas kernel's dots: its body's, times the grid blocks that run.

    Splash's forward and dq grids are (heads, q blocks, kv blocks), trimmed to the kv
    blocks a causal mask can reach: with nq query blocks ending at key block nk, the
    blocks on and below the diagonal, nq (nk - nq) + nq (nq + 1) / 2 (nq (nq + 1) / 2 when
    queries and keys are the same tokens). The dkv grid (kv blocks, heads, q blocks) is
    not trimmed and does not show the queries' offset: counted as the mean over a
    context-parallel group's offsets, nq (nk + 1) / 2, which a switch over those
    offsets (`cond`, averaged) makes exact."""
    body = eqn.params["jaxpr"]
    grid = tuple(int(g) for g in eqn.params["grid_mapping"].grid)
    name = str(eqn.params.get("name") or "")
    blocks = float(math.prod(grid))
    if name.startswith("splash") and len(grid) >= 3:
        lead = math.prod(grid[:-3])  # a vmapped batch adds leading grid dimensions
        if "dkv" in name:
            nk, heads, nq = grid[-3:]
            if nk % nq == 0:
                blocks = lead * heads * nq * (nk + 1) / 2
        else:
            heads, nq, nk = grid[-3:]
            if nk >= nq:
                blocks = lead * heads * (nq * (nk - nq) + nq * (nq + 1) / 2)
    return blocks * dot_flops(body, in_kernel=True)


_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_SHAPE = re.compile(r"([a-z]\w*)\[([\d,]*)\]")
_CALLS = re.compile(r"(?:body|to_apply|calls|condition|branch_computations)=\{?%?([\w.\-]+)")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2,
          "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def _shape_bytes(text: str) -> int:
    return sum(_BYTES.get(dt, 4) * (math.prod(int(d) for d in dims.split(",") if d) if dims else 1)
               for dt, dims in _SHAPE.findall(text))


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], dict[str, int]]:
    """An HLO module's computations (name -> instruction lines) and how many times each
    runs per step: its callers' counts times the trip counts of the while loops around it."""
    comps: dict[str, list[str]] = {}
    entry = None
    cur = None
    for line in hlo_text.splitlines():
        m = _COMP.match(line)
        if m:
            cur = m.group(1)
            comps[cur] = []
            if line.startswith("ENTRY"):
                entry = cur
            continue
        if cur is not None:
            comps[cur].append(line)
    # multiplicity of each computation: callers' multiplicity x while trip counts
    instrs = {im.group(1): (im.group(3), im.group(4)) for lines in comps.values() for line in lines
              if (im := _INSTR.match(line))}
    calls: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for name, lines in comps.items():
        for line in lines:
            trip = 1
            if " while(" in line:
                trip = _while_trips(line, comps, instrs)
            for callee in _CALLS.findall(line):
                calls[name].append((callee, trip if "body=%" + callee in line
                                    or "body=" + callee in line else 1))
    mult: dict[str, int] = defaultdict(int)

    def visit(name: str, m: int, depth: int = 0) -> None:
        if depth > 50:
            return
        mult[name] += m
        for callee, trip in calls.get(name, []):
            visit(callee, m * trip, depth + 1)

    if entry:
        visit(entry, 1)
    return comps, mult


def _executed(comps: dict[str, list[str]], mult: dict[str, int]):
    """(times run per step, instruction match, line) of every instruction of the
    computations that run (`_computations`)."""
    for name, lines in comps.items():
        m = mult.get(name, 0)
        if not m:
            continue
        for line in lines:
            im = _INSTR.match(line)
            if im:
                yield m, im, line


def collectives(hlo_text: str) -> list[dict[str, Any]]:
    """Collectives of an optimized HLO module: [{kind, count, bytes}] (bytes: output, per device)."""
    out: dict[str, dict[str, Any]] = {}
    for m, im, _ in _executed(*_computations(hlo_text)):
        op = im.group(3)
        kind = op.removesuffix("-start")
        if kind not in COLLECTIVES or op.endswith("-done"):
            continue
        shape = im.group(2)
        nbytes = _shape_bytes(shape)
        if op.endswith("-start") and shape.startswith("("):  # (operand, output) tuple
            parts = _SHAPE.findall(shape)
            nbytes = _shape_bytes("{}[{}]".format(*parts[-1])) if parts else nbytes
        rec = out.setdefault(kind, {"kind": kind, "count": 0, "bytes": 0})
        rec["count"] += m
        rec["bytes"] += m * nbytes
    return sorted(out.values(), key=lambda r: -r["bytes"])


_OPERAND = re.compile(r"(?:([a-z]\w*)\[([\d,]*)\]\S*\s+)?%([\w.\-]+)")
FP8_TYPES = ("f8e4m3fn", "f8e5m2", "f8e4m3", "f8e4m3fnuz", "f8e5m2fnuz", "f8e4m3b11fnuz")


def matmul_flops(hlo_text: str) -> dict[str, float]:
    """Matmul FLOPs per device of an optimized HLO module by operand types, e.g.
    {"f8e4m3fn x f8e4m3fn": ..., "bf16 x bf16": ...}: every dot and convolution (XLA:TPU
    writes matmuls as convolutions) times the runs of its computation, 2 per
    multiply-add. A dot contracts its lhs_contracting_dims; a convolution each output
    element over the kernel's input features and window (its dim_labels' `i` and digits)."""
    comps, mult = _computations(hlo_text)
    types: dict[str, tuple[str, list[int]]] = {}
    for lines in comps.values():
        for line in lines:
            im = _INSTR.match(line)
            if im:
                sh = _SHAPE.match(im.group(2).lstrip("("))
                if sh:
                    types[im.group(1)] = (sh.group(1), [int(d) for d in sh.group(2).split(",") if d])
    out: dict[str, float] = defaultdict(float)
    for m, im, line in _executed(comps, mult):
        if im.group(3) not in ("dot", "convolution"):
            continue
        sh = _SHAPE.match(im.group(2))
        ops = _OPERAND.findall(im.group(4).split(")", 1)[0])[:2]
        if not sh or len(ops) < 2:
            continue
        out_elems = math.prod(int(d) for d in sh.group(2).split(",") if d)
        (lt, ld, ln), (rt, rd, rn) = ops
        lhs = (lt, [int(d) for d in ld.split(",") if d]) if lt else types.get(ln)
        rhs = (rt, [int(d) for d in rd.split(",") if d]) if rt else types.get(rn)
        if lhs is None or rhs is None:
            continue
        if im.group(3) == "dot":
            cd = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
            dims = [int(d) for d in cd.group(1).split(",") if d] if cd else []
            contract = math.prod(lhs[1][d] for d in dims)
            out[f"{lhs[0]} x {rhs[0]}"] += 2.0 * m * out_elems * contract
        else:
            flops = _conv_flops(line, lhs[1], rhs[1], [int(d) for d in sh.group(2).split(",") if d])
            if flops is not None:
                out[f"{lhs[0]} x {rhs[0]}"] += m * flops
    return dict(out)


def _conv_flops(line: str, lhs: list[int], rhs: list[int], res: list[int]) -> float | None:
    """Multiply-adds x 2 of an HLO convolution. XLA:TPU writes a plain matmul as a
    convolution without spatial dims (`bf_io->bf`), and a batched one with its batch dims
    as spatial dims that dilation and strides make one tap wide: each output element
    sums over the kernel's input features and the window taps that land on a real
    (undilated, unpadded) input element, counted per spatial dim."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", line)
    if not labels:
        return None
    lab_l, lab_r, lab_o = labels.groups()
    if len(lab_l) != len(lhs) or len(lab_r) != len(rhs) or len(lab_o) != len(res):
        return None
    spatial = sorted(c for c in lab_o if c.isdigit())
    win = re.search(r"window=\{([^}]*)\}", line)
    fields = dict(kv.split("=", 1) for kv in win.group(1).split()) if win else {}

    def per_dim(key: str, default: int) -> list[int]:
        return [int(x) for x in fields[key].split("x")] if key in fields else [default] * len(spatial)

    size, stride = per_dim("size", 1), per_dim("stride", 1)
    lhs_dil, rhs_dil = per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1)
    pad_lo = ([int(p.split("_")[0]) for p in fields["pad"].split("x")] if "pad" in fields
              else [0] * len(spatial))
    taps = 1
    for d, c in enumerate(spatial):
        n, o = lhs[lab_l.index(c)], res[lab_o.index(c)]
        valid = 0
        for j in range(o):
            for k in range(size[d]):
                x = j * stride[d] + k * rhs_dil[d] - pad_lo[d]
                valid += 0 <= x <= (n - 1) * lhs_dil[d] and x % lhs_dil[d] == 0
        taps *= valid
    return 2.0 * res[lab_o.index("b")] * res[lab_o.index("f")] * rhs[lab_r.index("i")] * taps


def fp8_share(by_type: dict[str, float]) -> float:
    """The share of matmul FLOPs (`matmul_flops`) with both operands in an FP8 type."""
    total = sum(by_type.values())
    fp8 = sum(v for k, v in by_type.items() if all(t in FP8_TYPES for t in k.split(" x ")))
    return fp8 / total if total else 0.0


def _constant(name: str, instrs: dict[str, tuple[str, str]], depth: int = 0) -> int | None:
    """The integer value of `name` if it is a constant (through copies, bitcasts, converts)."""
    op, rest = instrs.get(name, ("", ""))
    if op == "constant":
        m = re.match(r"(-?\d+)\)", rest)
        return int(m.group(1)) if m else None
    if op in ("copy", "bitcast", "convert") and depth < 10:
        arg = re.match(r"%([\w.\-]+)\)", rest)
        return _constant(arg.group(1), instrs, depth + 1) if arg else None
    return None


def _while_trips(line: str, comps: dict[str, list[str]], instrs: dict[str, tuple[str, str]]) -> int:
    """Trips of a while loop: (bound - start) / step of the counter its condition compares
    with a constant (`i < bound`), the start read from the loop's initial tuple and the
    step from the body's update of it. XLA's own loops (a windowed einsum's: from 0 by 2)
    need all three; where any is not found, the bound alone (jax's scans: from 0 by 1)."""
    cond = re.search(r"condition=%?([\w.\-]+)", line)
    body = re.search(r"body=%?([\w.\-]+)", line)
    init = re.search(r" while\(%([\w.\-]+)\)", line)
    cond_lines = comps.get(cond.group(1), []) if cond else []
    bound = _trip_count(cond_lines)
    root = next((x for x in cond_lines if "ROOT" in x and " compare(" in x and "direction=LT" in x), "")
    args = re.findall(r"%([\w.\-]+)", root.split(" compare(", 1)[1]) if root else []
    index = None
    for a in args[:2]:
        op, rest = instrs.get(a, ("", ""))
        if op == "get-tuple-element":
            m = re.search(r"index=(\d+)", rest)
            index = int(m.group(1)) if m else None
    if index is None or not body or not init:
        return bound
    start = step = None
    op, rest = instrs.get(init.group(1), ("", ""))
    if op == "tuple":
        elems = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
        start = _constant(elems[index], instrs) if index < len(elems) else None
    root_body = next((x for x in comps.get(body.group(1), []) if "ROOT" in x and " tuple(" in x), "")
    elems = re.findall(r"%([\w.\-]+)", root_body.split(" tuple(", 1)[1].split(")", 1)[0]) if root_body else []
    if index < len(elems):
        op, rest = instrs.get(elems[index], ("", ""))
        if op == "add":
            vals = [_constant(a, instrs) for a in re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])]
            step = next((v for v in vals if v), None)
    if start is None or not step:
        return bound
    return max(0, -(-(bound - start) // step))


def _trip_count(cond_lines: list[str]) -> int:
    """A scan's while condition compares the counter with a constant: that is the trip
    count (s32 for jax's scans; XLA's own loops, e.g. a windowed einsum's, count in u32)."""
    consts = [int(x) for line in cond_lines
              for x in re.findall(r"[su](?:32|64)\[\](?:\{[^}]*\})?\s+constant\((\d+)\)", line)]
    return max(consts) if consts else 1



_START = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*? ([\w-]+-start|call-start)\(")
_DONE = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = .*? ([\w-]+-done|call-done)\(%([\w.\-]+)")
_COMPUTE = re.compile(r" (fusion|convolution|custom-call|dot)\(")


def async_overlap(hlo_text: str, op_name: str) -> list[dict[str, Any]]:
    """The asynchronous collectives of a scheduled HLO module whose source op name contains
    `op_name` (e.g. "context_parallel_gather": context parallelism's key/value gathers):
    for each start/done pair, the compute instructions (fusions, convolutions, custom
    calls, dots) the scheduler put between them, i.e. the work the collective overlaps.
    XLA:TPU runs collectives as `*-start`/`*-done` pairs, or on Ironwood as a
    `call-start`/`call-done` on the SparseCore; a collective left synchronous has none."""
    out: list[dict[str, Any]] = []
    comp: list[str] = []
    for line in hlo_text.splitlines() + [""]:
        if _COMP.match(line) or not line.strip():
            open_: dict[str, int] = {}
            for i, ln in enumerate(comp):
                s = _START.match(ln)
                if s and 'op_name="' in ln and op_name in ln.split('op_name="', 1)[1].split('"', 1)[0]:
                    open_[s.group(1)] = i
                    continue
                d = _DONE.match(ln)
                if d and d.group(2) in open_:
                    i0 = open_.pop(d.group(2))
                    out.append({"name": d.group(2), "kind": _START.match(comp[i0]).group(2),
                                "compute_between": sum(bool(_COMPUTE.search(x)) for x in comp[i0 + 1:i])})
            comp = []
            continue
        comp.append(line)
    return out

"""Plan output: a readable table in the terminal, JSON, and a step-time breakdown plot."""

from __future__ import annotations

import io

from megamesh.fileio import write_new_file
from megamesh.plan.cost import Estimate
from megamesh.plan.target import Target

GiB = 2**30


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def why(ranked: list[Estimate]) -> str:
    if not ranked:
        return ""
    b = ranked[0]
    if len(ranked) == 1:
        return f"{b.layout.text()} is the only layout that fits."
    r = ranked[1]
    gain = r.step_time_s / b.step_time_s - 1
    parts = ", ".join(f"{k} {_fmt_s(v)}" for k, v in b.breakdown.items() if v > 0)
    return (f"{b.layout.text()} (remat {b.layout.remat}, {b.layout.microbatches} microbatch"
            f"{'es' if b.layout.microbatches > 1 else ''}) wins: {gain:.1%} faster than the next "
            f"({r.layout.text()}, remat {r.layout.remat}, bottleneck {r.bottleneck}); its time goes "
            f"to {parts}; bottleneck {b.bottleneck}.")


def table(ranked: list[Estimate], top: int) -> str:
    width = max([40] + [len(e.layout.text()) for e in ranked[:top]])
    head = (f"{'#':>2}  {'layout':<{width}} {'remat':<13} {'mb':>3} {'step':>10} {'MFU':>6} "
            f"{'tok/s/chip':>11} {'HBM/dev':>10} {'bottleneck':<10}")
    lines = [head, "-" * len(head)]
    for i, e in enumerate(ranked[:top], 1):
        lines.append(f"{i:>2}  {e.layout.text():<{width}} {e.layout.remat:<13} {e.layout.microbatches:>3} "
                     f"{_fmt_s(e.step_time_s):>10} {e.mfu:>6.1%} {e.tokens_per_s_per_chip:>11,.0f} "
                     f"{e.memory.total / GiB:>6.1f} GiB {e.bottleneck:<10}")
    return "\n".join(lines)


def plot(ranked: list[Estimate], path: str, title: str) -> None:
    """Stacked bars of the step-time breakdown of the top candidates."""
    import matplotlib  # only for --plot: a heavy import the plain reports never need

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = ranked[:8]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    bottom = [0.0] * len(top)
    for key in ("compute", "hbm", "ici", "dcn", "host", "bubble"):
        vals = [e.breakdown.get(key, 0.0) for e in top]
        if not any(vals):
            continue
        ax.bar(range(len(top)), vals, bottom=bottom, label=key)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(top)), [f"{e.layout.text()}\n{e.layout.remat}" for e in top],
                  rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("seconds per step (exposed)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_new_file(path, buf.getvalue())


def header(target: Target) -> str:
    s = f"target: {target.describe()}"
    if target.note:
        s += f"\nnote: {target.note}"
    return s

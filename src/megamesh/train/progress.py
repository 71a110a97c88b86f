"""Progress display: a rich progress bar in a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    def __init__(self, total: int, start: int, enabled: bool, rich: bool | None, every: int):
        self.enabled, self.every, self.total = enabled, every, total
        self.rich = None
        if enabled and (sys.stdout.isatty() if rich is None else rich):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.rich = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.rich.add_task("train", total=total, completed=start, info="")
            self.rich.start()

    def update(self, step: int, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        info = (f"loss {rec['loss']:.4f}  {rec['tokens_per_s']:,.0f} tok/s  mfu {rec['mfu']:.1%}"
                + (f"  val {rec['val_loss']:.4f}" if "val_loss" in rec else ""))
        if self.rich is not None:
            self.rich.update(self.task, completed=step, info=info)
        elif step % self.every == 0 or step == self.total or "val_loss" in rec:
            print(f"step {step}/{self.total}  {info}  lr {rec['lr']:.2e}  "
                  f"grad_norm {rec['grad_norm']:.3f}  goodput {rec['goodput']:.1%}", flush=True)

    def close(self) -> None:
        if self.rich is not None:
            self.rich.stop()

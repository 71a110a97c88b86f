"""Checkpoint/restart theory (Young 1974; Daly 2006), all times in one unit (e.g. hours).

- Young (CACM 17(9), 1974): tau = sqrt(2 * delta * M).
- Daly (FGCS 22(3), 2006, doi:10.1016/j.future.2004.11.016), for delta < 2M:
  tau = sqrt(2 delta M) [1 + (1/3) sqrt(delta / 2M) + (1/9) (delta / 2M)] - delta; else M.
- Daly's expected wall time for T_s of work with interval tau, save delta, restart R and
  exponential failures of mean M (failures may strike during saves and restarts):
  T_w = M e^(R/M) (e^((tau + delta)/M) - 1) T_s / tau, so goodput = T_s / T_w.
delta: checkpoint save time; M: mean time between failures of the whole job.
"""

from __future__ import annotations

import math


def young_interval(delta: float, mtbf: float) -> float:
    return math.sqrt(2 * delta * mtbf)


def daly_interval(delta: float, mtbf: float) -> float:
    if delta >= 2 * mtbf:
        return mtbf
    x = delta / (2 * mtbf)
    return math.sqrt(2 * delta * mtbf) * (1 + math.sqrt(x) / 3 + x / 9) - delta


def daly_goodput(tau: float, delta: float, restart: float, mtbf: float) -> float:
    """Useful work / wall time in Daly's model (no waiting for repairs)."""
    if not math.isfinite(mtbf):
        return tau / (tau + delta)
    return tau / (mtbf * math.exp(restart / mtbf) * math.expm1((tau + delta) / mtbf))

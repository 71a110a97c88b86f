"""What a token trained by DiLoCo islands is worth, in tokens of synchronous training.

Throughput goodput counts every token trained; a token trained by one of M islands that
average every H steps is worth less than one of synchronous (data-parallel) training,
because the run ends at a higher loss. Two published pieces make the exchange rate:

1. The loss increase of DiLoCo over data parallel, from Charles et al. 2025 ("Scaling
   Laws for DiLoCo", arXiv 2503.09799), evaluation loss vs data parallel at H = 30 and
   Chinchilla-optimal tokens, models of 35M to 10B parameters and M = 1..8 replicas
   (their table: e.g. +3.9% at 35M / M=8, +1.7% at 550M / M=8, +1.1% at 2.4B / M=8,
   +0.18% / +0.29% at 4B / 10B with M=4). Fitted here (least squares in logs on the rows
   where DiLoCo is worse): increase = 0.163% x (N / 1e9)^-0.393 x (M - 1)^1.04. Where the
   paper finds DiLoCo better than data parallel (M = 1-2 at 2.4B and up) the increase is
   taken as 0: no credit beyond synchronous quality.
2. Tokens that buy that much loss, from Chinchilla's fitted loss L(N, D) = E + A / N^a +
   B / D^b (Hoffmann et al. 2022, arXiv 2203.15556: E 1.69, A 406.4, B 410.7, a 0.34, b
   0.28): the synchronous run reaching the DiLoCo run's loss needs D_eff < D tokens;
   efficiency = D_eff / D.

Extrapolation, said in every answer: the fit's data span 35M-10B parameters, M <= 8 and
H = 30; the paper reports loss rising "slowly" with H from 5 to 300 without a figure this
model can use, so H is not modelled (optimistic for H > 30). A 2T-parameter run on 72
islands every 500 steps is far outside all three ranges.
"""

from __future__ import annotations

from typing import Any

# Charles et al. 2025, fitted here (module docstring)
LOSS_COEF, LOSS_N_EXP, LOSS_M_EXP = 0.163e-2, -0.393, 1.04
FIT_PARAMS = (35e6, 10e9)
FIT_ISLANDS = 8
FIT_H = 30
# Chinchilla (Hoffmann et al. 2022), approach 3
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28


def loss_increase(params: float, islands: int) -> float:
    """DiLoCo's final loss over data parallel's, as a fraction (0.01 = +1%), >= 0."""
    if islands <= 1:
        return 0.0
    return LOSS_COEF * (params / 1e9) ** LOSS_N_EXP * (islands - 1) ** LOSS_M_EXP


def token_efficiency(params: float, tokens: float, islands: int, inner_steps: int) -> dict[str, Any]:
    """Tokens of synchronous training each DiLoCo token is worth (0..1], with the loss
    increase behind it and what lies outside the published ranges."""
    delta = loss_increase(params, islands)
    data = B / tokens**BETA
    loss = E + A / params**ALPHA + data
    eff = (data / (data + delta * loss)) ** (1 / BETA) if delta > 0 else 1.0
    outside = []
    if not FIT_PARAMS[0] <= params <= FIT_PARAMS[1]:
        outside.append(f"{params / 1e9:,.0f}B parameters (published: 0.035-10B)")
    if islands > FIT_ISLANDS:
        outside.append(f"{islands} islands (published: up to {FIT_ISLANDS})")
    if inner_steps != FIT_H:
        outside.append(f"H={inner_steps} (published: H={FIT_H}; loss rises slowly with H, not modelled)")
    return {"efficiency": eff, "loss_increase": delta, "extrapolated": "; ".join(outside) or None,
            "source": "Charles et al. 2025 (arXiv 2503.09799) loss vs data parallel, fitted; "
                      "Chinchilla L(N, D) (arXiv 2203.15556) to convert loss to tokens"}

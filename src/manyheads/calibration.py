"""Calibration: temperature scaling for classifier heads, split-conformal intervals for number heads, and ECE.

Pure functions of outputs and targets; the head kinds apply what they return (``Head.calibrate``).
Temperature scaling (Guo et al. 2017) divides a head's logits by one scalar fitted by minimising
the negative log-likelihood on held-out rows. Split conformal prediction (Vovk et al. 2005; Lei et
al. 2018) turns held-out scores ``s_i`` into an interval holding a new answer with probability at
least ``coverage`` on average over people (marginal coverage, not a promise for each person).

    t = fit_temperature(lambda z: head_nll(z), logits)   # see Head.calibrate
    q = conformal_quantile(scores, 0.9)                  # interval: prediction +- q (times the spread)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


def fit_temperature(nll: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor) -> float:
    """The temperature ``T`` minimising ``nll(logits / T)`` (mean negative log-likelihood), in [0.05, 20].

    Optimised over ``log T`` by L-BFGS from T = 1, as Guo et al.; a flat NLL keeps 1.
    """
    logits = logits.detach().float()
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nll(logits / log_t.exp())
        loss.backward()
        return loss

    optimizer.step(closure)
    t = float(log_t.detach().exp())
    return min(max(t, 0.05), 20.0) if math.isfinite(t) else 1.0


def conformal_quantile(scores: Sequence[float] | torch.Tensor, coverage: float) -> float:
    """The split-conformal threshold: the ceil((n + 1) * coverage)-th smallest score (inf if n is too small)."""
    if not 0 < coverage < 1:
        raise ValueError(f"coverage must be in (0, 1), e.g. 0.9; got {coverage!r}")
    values = torch.as_tensor(scores, dtype=torch.float64).flatten().sort().values
    rank = math.ceil((len(values) + 1) * coverage)
    return float(values[rank - 1]) if rank <= len(values) else math.inf


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - confidence| weighted by the bin's share.

    ``confidence`` is each answer's probability, ``correct`` whether the answer was right.
    """
    confidence, correct = confidence.detach().double().flatten(), correct.detach().double().flatten()
    if confidence.numel() == 0:
        return math.nan
    index = (confidence * bins).long().clamp(0, bins - 1)
    right = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    sure = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence)
    return float(((right - sure).abs()).sum() / confidence.numel())


def reliability(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> list[dict]:
    """Per confidence bin: its range, rows, mean confidence and accuracy (the reliability diagram's bars)."""
    confidence, correct = confidence.detach().double().flatten(), correct.detach().double().flatten()
    index = (confidence * bins).long().clamp(0, bins - 1)
    rows = []
    for b in range(bins):
        members = index == b
        n = int(members.sum())
        rows.append({"low": b / bins, "high": (b + 1) / bins, "rows": n,
                     "confidence": float(confidence[members].mean()) if n else None,
                     "accuracy": float(correct[members].mean()) if n else None})  # fmt: skip
    return rows

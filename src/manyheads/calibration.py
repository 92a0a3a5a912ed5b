"""Calibration math: one temperature per classifier head, split-conformal intervals for numbers.

A head kind calls these from its ``calibrate`` (see ``heads/``); :func:`manyheads.inference.calibrate`
runs a trained net over held-out labelled rows and asks each head to calibrate itself.

* Temperature scaling (Guo et al. 2017): logits are divided by one scalar ``T`` fitted by
  minimising the negative log-likelihood on the calibration rows. Argmax answers do not change.
* Split conformal prediction: on ``n`` calibration rows with scores ``s_i`` (absolute errors, or
  errors divided by the head's predicted spread), the interval ``value +- q * spread`` with ``q``
  the ``ceil((n + 1) c)``-th smallest score covers a new row's true value with probability at
  least ``c``, on average over rows drawn like the calibration rows. Scores are kept as a quantile
  grid, so the coverage can be changed after training without the rows.

    T = fit_temperature(lambda t: nll(logits / t, labels))
    grid = Scores.of(np.abs(y - y_hat)); q = grid.quantile(0.9)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

GRID = 401  # levels 0, 1/400, ..., 1 of each score distribution kept in the model file
MIN_ROWS_PER_BIN = 200  # the adaptive interval's groups: enough rows for a stable 90-95 % quantile
MAX_BINS = 8
INTERVALS = ("adaptive", "plain")


def fit_temperature(nll: Callable[[float], float], low: float = 0.05, high: float = 20.0, steps: int = 60) -> float:
    """The temperature in ``[low, high]`` that minimises ``nll(T)`` (golden-section search on log T).

    The NLL of temperature-scaled softmax logits is unimodal in ``log T``, so the search finds its minimum.

        fit_temperature(lambda t: float(F.cross_entropy(logits / t, labels)))
    """
    a, b = math.log(low), math.log(high)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(math.exp(c)), nll(math.exp(d))
    for _ in range(steps):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(math.exp(d))
    return float(math.exp((a + b) / 2))


def check_coverage(coverage: Any, what: str = "coverage") -> float:
    """``coverage`` as a float in (0, 1), or a ValueError saying what to give."""
    if isinstance(coverage, bool) or not isinstance(coverage, int | float) or not 0 < coverage < 1:
        raise ValueError(f"{what} must be a fraction between 0 and 1 (e.g. 0.9 for 90 % intervals), got {coverage!r}")
    return float(coverage)


@dataclass(frozen=True)
class Scores:
    """The distribution of ``n`` conformity scores, kept as its quantiles at ``GRID`` even levels."""

    n: int
    levels: tuple[float, ...]

    @classmethod
    def of(cls, scores: np.ndarray) -> Scores:
        """Scores.of(np.abs(errors))"""
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if scores.size == 0:
            raise ValueError("no calibration rows to compute an interval from")
        grid = np.quantile(scores, np.linspace(0, 1, GRID), method="inverted_cdf")
        return cls(int(scores.size), tuple(float(f"{v:.6g}") for v in grid))

    def quantile(self, coverage: float) -> float:
        """The conformal quantile: the ``ceil((n + 1) c)``-th smallest score (inf when n is too small).

        Read from the grid at the next level at or above ``k / n``: never below the exact order statistic.
        """
        k = math.ceil((self.n + 1) * coverage)
        if k > self.n:
            return math.inf
        index = min(GRID - 1, math.ceil(k / self.n * (GRID - 1) - 1e-9))
        return self.levels[index]

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "levels": list(self.levels)}

    @classmethod
    def from_json(cls, data: Any, where: str) -> Scores:
        if not isinstance(data, Mapping) or not isinstance(data.get("n"), int) or data["n"] < 1:
            raise ValueError(f"{where}: a score record needs 'n' (rows, >= 1) and 'levels'")
        levels = data.get("levels")
        if not isinstance(levels, Sequence) or len(levels) != GRID or not all(_finite(v) for v in levels):
            raise ValueError(f"{where}: 'levels' must be {GRID} finite numbers")
        if any(b < a for a, b in zip(levels, levels[1:])):
            raise ValueError(f"{where}: 'levels' must not decrease")
        return cls(data["n"], tuple(float(v) for v in levels))


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def bin_edges(values: np.ndarray) -> list[float]:
    """Edges between groups of about equal size of predicted values (at least ``MIN_ROWS_PER_BIN`` each)."""
    bins = int(min(MAX_BINS, max(1, len(values) // MIN_ROWS_PER_BIN)))
    edges = np.quantile(np.asarray(values, dtype=np.float64), np.linspace(0, 1, bins + 1)[1:-1])
    return sorted({float(f"{e:.6g}") for e in edges})


def bin_of(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Each value's group: the number of edges below it (as the deployed graph computes it)."""
    return (np.asarray(values)[:, None] > np.asarray(edges, dtype=np.float64)[None, :]).sum(axis=1)


@dataclass(frozen=True)
class Conformal:
    """A regression head's calibration: plain scores, and adaptive ones (per group, or per unit of spread).

    ``method`` is ``"spread"`` (scores are errors over the head's predicted spread) or ``"binned"``
    (scores per group of predicted values between ``edges``: Mondrian conformal prediction).
    """

    coverage: float
    interval: str
    plain: Scores
    method: str
    adaptive: tuple[Scores, ...]
    edges: tuple[float, ...] = ()

    @classmethod
    def fit(cls, value: np.ndarray, target: np.ndarray, spread: np.ndarray | None, coverage: float,
            interval: str = "adaptive") -> Conformal:  # fmt: skip
        """From calibration rows' answers, true values and (optionally) predicted spreads."""
        error = np.abs(np.asarray(target, np.float64) - np.asarray(value, np.float64))
        if spread is not None:
            return cls(coverage, interval, Scores.of(error), "spread", (Scores.of(error / spread),))
        edges = bin_edges(value)
        groups = bin_of(value, edges)
        adaptive = tuple(Scores.of(error[groups == g]) for g in range(len(edges) + 1))
        return cls(coverage, interval, Scores.of(error), "binned", adaptive, tuple(edges))

    def half_widths(self, coverage: float | None = None) -> tuple[float, list[float]]:
        """The plain half-width, and the adaptive one per group (or per unit of spread)."""
        c = self.coverage if coverage is None else coverage
        return self.plain.quantile(c), [s.quantile(c) for s in self.adaptive]

    def to_json(self) -> dict[str, Any]:
        adaptive = [s.to_json() for s in self.adaptive]
        return {"coverage": self.coverage, "interval": self.interval, "plain": self.plain.to_json(),
                "method": self.method, "adaptive": adaptive, "edges": list(self.edges)}  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping, where: str) -> Conformal:
        coverage = check_coverage(data.get("coverage"), f"{where}: coverage")
        interval, method = data.get("interval", "adaptive"), data.get("method")
        if interval not in INTERVALS:
            raise ValueError(f"{where}: interval must be one of {INTERVALS}, got {interval!r}")
        if method not in ("spread", "binned"):
            raise ValueError(f"{where}: method must be 'spread' or 'binned', got {method!r}")
        adaptive = tuple(Scores.from_json(s, where) for s in data.get("adaptive") or [])
        edges = tuple(data.get("edges") or ())
        if not all(_finite(e) for e in edges) or len(adaptive) != (len(edges) + 1 if method == "binned" else 1):
            raise ValueError(f"{where}: the adaptive scores do not match the method and its edges")
        return cls(coverage, interval, Scores.from_json(data.get("plain"), where), method, adaptive, edges)

"""Balancing: how the heads' losses combine into one objective (or one trunk update).

``weights=`` in :func:`manyheads.fit` is either a mapping of constant weights per head or the
name of a strategy in :data:`STRATEGIES`:

- ``"constant"``: the weighted sum (the default; constants come from ``weights={...}``).
- ``"uncertainty"``: learned log-variances (Kendall, Gal & Cipolla 2018).
- ``"dwa"``: Dynamic Weight Average (Liu, Johns & Davison 2019).
- ``"gradnorm"``: GradNorm on the shared features (Chen et al. 2018).
- ``"upgrad"``, ``"mgda"``, ``"pcgrad"``, ``"cagrad"``, ``"nashmtl"`` and ``"jd:<Name>"``:
  gradient aggregation on the trunk through torchjd (see :mod:`.jacobian`).

A torchjd aggregator instance is accepted too. Each head's constant ``loss.weight`` (from
``weights={...}``; 1 when ``weights=`` names a strategy) multiplies its loss before any strategy
weights it, and ``normalize=True`` divides each loss by the trivial predictor's loss first.

Under fp16 (a grad scaler) every strategy works. Under torchrun (world > 1) ``constant``,
``uncertainty`` (log-variances re-averaged over processes each epoch) and ``dwa`` (from the
all-reduced epoch losses) work; ``gradnorm`` and the gradient-aggregation strategies need the
trunk's shared features on one process and raise a ``ValueError``.

    balancer = create("dwa", losses)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from manyheads.balancing.base import Balancer, Scale
from manyheads.balancing.dwa import DWA, dwa_weights
from manyheads.balancing.gradnorm import GradNorm
from manyheads.balancing.jacobian import AGGREGATORS, Jacobian, build_aggregator
from manyheads.balancing.uncertainty import Uncertainty
from manyheads.losses import ResolvedLosses

STRATEGIES: dict[str, Callable[..., Balancer]] = {
    "constant": Balancer,
    "uncertainty": Uncertainty,
    "dwa": DWA,
    "gradnorm": GradNorm,
    **{key: partial(Jacobian, aggregator=name) for key, name in AGGREGATORS.items()},
}


def _is_aggregator(weights: Any) -> bool:
    try:
        from torchjd.aggregation import Aggregator
    except ImportError:
        return False
    return isinstance(weights, Aggregator)


def create(
    weights: Mapping[str, float] | str | Any | None,
    losses: ResolvedLosses,
    normalizers: Mapping[str, float] | None = None,
    *,
    scale: Scale = None,
) -> Balancer:
    """A balancer for ``weights``: constants (already in ``losses``), a strategy name, or an aggregator.

    ``scale`` is the fp16 grad scaler's ``scale`` (``Precision.grad_scale``), or None.

        balancer = create("gradnorm", losses, scale=precision.grad_scale)
    """
    if weights is None or isinstance(weights, Mapping):
        return Balancer(losses, normalizers, scale=scale)
    if _is_aggregator(weights):
        return Jacobian(losses, normalizers, aggregator=weights, scale=scale)
    if not isinstance(weights, str):
        raise ValueError(
            f"weights must be a mapping head -> number, a strategy name or a torchjd aggregator, got {weights!r}"
        )
    key = weights.strip().lower()
    if key.startswith("jd:"):
        return Jacobian(losses, normalizers, aggregator=weights.strip()[3:], scale=scale)
    if key not in STRATEGIES:
        raise ValueError(
            f"unknown balancing strategy {weights!r}; available: {sorted(STRATEGIES)} or 'jd:<torchjd aggregator>'"
        )
    return STRATEGIES[key](losses, normalizers, scale=scale)


__all__ = [
    "DWA", "STRATEGIES", "Balancer", "GradNorm", "Jacobian", "Uncertainty", "build_aggregator", "create",
    "dwa_weights",
]  # fmt: skip

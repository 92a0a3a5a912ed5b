"""Gradient aggregation through torchjd: the trunk follows a combination of the heads' gradients.

Instead of summing losses, each head's gradient with respect to the shared trunk becomes one row
of a Jacobian, and an aggregator from torchjd (Quinton & Rey, "Jacobian Descent for
Multi-Objective Optimization", 2024) turns it into the trunk's update; head layers get their own
loss's gradient as usual. ``torchjd.autojac.mtl_backward`` builds the Jacobian from the shared
features (one vectorised backward through the trunk, not one per head) and ``jac_to_grad``
aggregates it. Strategies by name:

- ``"upgrad"``: UPGrad (Quinton & Rey 2024), projects each gradient onto the dual cone of all.
- ``"mgda"``: MGDA (Désidéri 2012; Sener & Koltun 2018), the min-norm convex combination.
- ``"pcgrad"``: PCGrad (Yu et al. 2020), projects away conflicting components.
- ``"cagrad"``: CAGrad (Liu et al. 2021) with ``c = 0.4``, the paper's value (needs cvxpy).
- ``"nashmtl"``: Nash-MTL (Navon et al. 2022), the bargaining solution (needs cvxpy and ecos).
- ``"jd:<Name>"``: any other aggregator class of ``torchjd.aggregation``, e.g. ``"jd:IMTLG"``.

The history's ``weight/<head>`` is the epoch's mean of the aggregator's weights on the Jacobian
rows (1.0 for aggregators without weights). UPGrad and MGDA weights sum to about 1: the trunk
moves along an average of the heads' gradients, not their sum.

Under fp16 the grad scaler's factor is taken out of the Jacobian before aggregating and put back
after, so every aggregator (scale-dependent ones like Nash-MTL too) sees true gradients, and a
step with overflowing gradients is still skipped by the scaler. DDP (torchrun, world > 1) and
``outputs_dict`` modules have no shared features to aggregate on: these strategies refuse them.

    mh.fit(net, df, weights="upgrad")
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from manyheads.balancing.base import Balancer, Scale, needs_features_error
from manyheads.losses import ResolvedLosses

AGGREGATORS = {"upgrad": "UPGrad", "mgda": "MGDA", "pcgrad": "PCGrad", "cagrad": "CAGrad", "nashmtl": "NashMTL"}
DEFAULTS = {"CAGrad": {"c": 0.4}}  # arguments torchjd requires, at the values their papers use


def _torchjd():
    try:
        import torchjd.aggregation as aggregation
        from torchjd.autojac import jac_to_grad, mtl_backward
    except ImportError as error:
        raise ValueError(
            f"gradient-aggregation strategies need torchjd >= 0.18 ({error}); "
            "install it with: pip install 'manyheads[balancing]'"
        ) from None
    return aggregation, mtl_backward, jac_to_grad


def build_aggregator(name: str, n_tasks: int) -> Any:
    """A torchjd aggregator by class name, with the arguments it needs for ``n_tasks`` heads."""
    aggregation, _, _ = _torchjd()
    bases = (aggregation.Aggregator, aggregation.WeightedAggregator, aggregation.GramianWeightedAggregator)
    known = {
        n: c for n, c in vars(aggregation).items() if isinstance(c, type) and issubclass(c, bases[0]) and c not in bases
    }
    match = name if name in known else next((n for n in known if n.lower() == name.lower()), None)
    if match is None:
        raise ValueError(f"torchjd has no aggregator {name!r}; available: {sorted(known)}")
    name, cls = match, known[match]
    kwargs = dict(DEFAULTS.get(name, {}))
    parameters = inspect.signature(cls).parameters
    if "n_tasks" in parameters:
        kwargs["n_tasks"] = n_tasks
    missing = [p for p, v in parameters.items() if v.default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        raise ValueError(
            f"torchjd's {name} needs {missing}; build it yourself and pass it: "
            f"mh.fit(..., weights=torchjd.aggregation.{name}(...))"
        )
    try:
        return cls(**kwargs)
    except ImportError as error:  # optional solvers (quadprog, cvxpy, ...) are missing
        raise ValueError(f"weights={name!r}: {error}") from None


def _leaves(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The parameters ``tensor`` was computed from that require grad (the trunk's, here)."""
    found, seen, stack = [], set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold the leaf
        if variable is not None:
            found.append(variable)
        stack.extend(child for child, _ in node.next_functions)
    return found


class Jacobian(Balancer):
    """Aggregate the heads' gradients on the trunk with a torchjd aggregator (see module doc)."""

    needs_features = True

    def __init__(
        self,
        losses: ResolvedLosses,
        normalizers: Mapping[str, float] | None = None,
        aggregator: str | Any = "UPGrad",
        *,
        scale: Scale = None,
    ) -> None:
        super().__init__(losses, normalizers, scale=scale)
        if isinstance(aggregator, str):
            self.name = next((k for k, v in AGGREGATORS.items() if v == aggregator), f"jd:{aggregator}")
            build_aggregator(aggregator, len(self.heads))  # fail now, not at the first step
            self._spec, self._fixed = aggregator, None
        else:
            self.name = f"jd:{type(aggregator).__name__}"
            self._spec, self._fixed = type(aggregator).__name__, aggregator
        # One aggregator per set of labelled heads: stateful ones (Nash-MTL) are sized per task count.
        self._aggregators: dict[tuple[int, ...], Any] = {}
        self.register_buffer("weight_sum", torch.zeros(len(self.heads)))
        self.register_buffer("weight_steps", torch.zeros(len(self.heads)))

    def _aggregator(self, rows: tuple[int, ...]) -> Any:
        if self._fixed is not None:
            return self._fixed
        if rows not in self._aggregators:
            self._aggregators[rows] = build_aggregator(self._spec, len(rows))
        return self._aggregators[rows]

    def start_epoch(self, epoch: int, train_losses: list[dict[str, float]]) -> None:
        self.weight_sum.zero_()
        self.weight_steps.zero_()

    def weights(self) -> dict[str, float]:
        steps = self.weight_steps.tolist()
        means = (self.weight_sum / self.weight_steps.clamp(min=1)).tolist()
        return {name: self.base[name] * (m if s else 1.0) for name, m, s in zip(self.heads, means, steps)}

    def backward(self, losses: Mapping[str, torch.Tensor], features: torch.Tensor | None = None) -> None:
        if features is None:
            raise needs_features_error(self.name)
        based = self.based(losses)
        # Heads without labels in this batch (loss exactly 0) would be zero rows, which makes
        # MGDA-like aggregators stop the trunk: aggregate over the labelled heads only.
        rows = tuple(i for i, value in enumerate(torch.stack([b.detach() for b in based]).tolist()) if value != 0)
        shared = _leaves(features) if features.requires_grad else []
        if len(rows) < 2 or not shared:  # nothing to aggregate: a frozen trunk, or one head labelled
            super().backward(losses, features)
            return
        _, mtl_backward, jac_to_grad = _torchjd()
        factor = self.scale(torch.ones((), device=features.device)) if self.scale else None
        tensors = [based[i] * factor if factor is not None else based[i] for i in rows]
        mtl_backward(tensors, features=features, shared_params=shared)
        if factor is not None:
            if not bool(torch.stack([torch.isfinite(p.jac).all() for p in shared]).all()):  # one sync
                for p in shared:  # overflow: leave non-finite grads so the scaler skips this step
                    p.grad = p.jac.sum(dim=0)
                    del p.jac
                return
            for p in shared:
                p.jac.div_(factor)
        weights = jac_to_grad(shared, self._aggregator(rows))
        if factor is not None:
            for p in shared:
                p.grad.mul_(factor)
        if weights is not None:
            index = torch.tensor(rows, device=self.weight_sum.device)
            self.weight_sum.index_add_(0, index, weights.detach().to(self.weight_sum))
            self.weight_steps.index_add_(0, index, torch.ones(len(rows), device=self.weight_steps.device))

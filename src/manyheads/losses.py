"""Losses: a registry of per-sample losses, and the resolved loss of each head.

A head's loss is a registered name (``"mse"``, ``"mae"``, ``"huber"``, ``"bce"``,
``"cross_entropy"``, ``"focal"``, ``"corn"``), a torch loss module, or any callable
``(output, target) -> per-sample or scalar loss`` (called on labelled rows only).

    mh.fit(net, data, losses={"age": "mae", "race": my_loss})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from manyheads.heads import Head

PerSample = Callable[..., torch.Tensor]  # (output, target, class_weight) -> [B] losses


def _mse(output, target, class_weight):
    return (output - target).square()


def _mae(output, target, class_weight):
    return (output - target).abs()


def _huber(output, target, class_weight):
    return F.huber_loss(output, target, reduction="none", delta=1.0)


def _bce(output, target, class_weight):
    if output.ndim == 2:  # multi-label: class_weight is a per-label positive weight
        losses = F.binary_cross_entropy_with_logits(output, target, pos_weight=class_weight, reduction="none")
        return losses.mean(dim=1)
    return F.binary_cross_entropy_with_logits(output, target, reduction="none")


def _cross_entropy(output, target, class_weight):
    return F.cross_entropy(output, target, reduction="none")


def _focal(output, target, class_weight, gamma: float = 2.0):
    """Focal loss (Lin et al. 2017) on sigmoid outputs: BCE scaled by (1 - p_true) ** gamma."""
    ce = F.binary_cross_entropy_with_logits(output, target, reduction="none")
    losses = (1 - torch.exp(-ce)) ** gamma * ce
    return losses.mean(dim=1) if losses.ndim == 2 else losses


def _focal_softmax(output, target, class_weight, gamma: float = 2.0):
    """Focal loss on softmax outputs (categorical heads): cross-entropy scaled by (1 - p_true) ** gamma."""
    ce = F.cross_entropy(output, target, reduction="none")
    return (1 - torch.exp(-ce)) ** gamma * ce


def _corn(output, target, class_weight):
    """CORN (Shi, Cao and Raschka 2021): threshold j is trained on rows with rank >= j only."""
    k1 = output.shape[1]
    thresholds = torch.arange(k1, device=output.device)
    eligible = (target[:, None] >= thresholds).float()  # conditional training subsets
    above = (target[:, None] > thresholds).float()
    losses = F.binary_cross_entropy_with_logits(output, above, reduction="none") * eligible
    return losses.sum(dim=1) / eligible.sum(dim=1).clamp(min=1)


REGISTRY: dict[str, PerSample] = {
    "mse": _mse,
    "mae": _mae,
    "huber": _huber,
    "bce": _bce,
    "cross_entropy": _cross_entropy,
    "focal": _focal,
    "corn": _corn,
}
ALIASES = {
    "l2": "mse",
    "l1": "mae",
    "binary_crossentropy": "bce",
    "ce": "cross_entropy",
    "crossentropy": "cross_entropy",
}
# Which registered losses make sense for which head kinds.
SUITS = {
    "regression": {"mse", "mae", "huber"},
    "binary": {"bce", "focal"},
    "categorical": {"cross_entropy", "focal"},
    "ordinal": {"corn", "cross_entropy"},
    "multilabel": {"bce", "focal"},
}
SMOOTHABLE = {"bce", "cross_entropy", "focal"}  # losses that take the soft targets of label_smoothing


@dataclass
class HeadLoss:
    """One head's resolved loss: what is computed and with which weight.

    ``scale`` divides regression errors (the training targets' spread) so heads share a scale;
    ``class_weight`` holds per-class weights for classifiers.
    """

    head: str
    kind: Head
    name: str
    fn: Callable
    weight: float = 1.0
    builtin: bool = True
    scale: float = 1.0
    class_weight: torch.Tensor | None = None

    def __call__(self, output: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """Mean loss over labelled rows; 0 (not NaN) when the batch has none for this head."""
        output = self.kind.canonical(output)
        if not self.builtin:
            return self._custom(output, target, labelled)
        if self.kind.kind == "ordinal" and self.name == "cross_entropy":
            output = self.kind.proba(output).clamp_min(1e-7).log()
        output = output.float()
        if self.kind.kind == "regression":
            output, target = output / self.scale, target / self.scale
        per_sample = self.fn(output, self._smoothed(target, output.shape[-1]), self.class_weight)
        mask = labelled.to(per_sample.dtype)
        if self.class_weight is not None and self.kind.kind in ("binary", "categorical", "ordinal"):
            mask = mask * self.class_weight.to(per_sample.device)[target.long()]
        return (per_sample * mask).sum() / mask.sum().clamp(min=1e-12)

    def _smoothed(self, target: torch.Tensor, classes: int) -> torch.Tensor:
        """Targets moved ``e`` towards uniform; class indices become probability rows."""
        e = self.kind.label_smoothing
        if not e:
            return target
        if self.kind.kind in ("binary", "multilabel"):
            return target * (1 - e) + e / 2
        return F.one_hot(target.long(), classes).float() * (1 - e) + e / classes

    def _custom(self, output, target, labelled):
        output, target = output[labelled], target[labelled]
        if output.shape[0] == 0:
            return output.sum() * 0.0  # keeps the graph and adds nothing
        loss = self.fn(output, target)
        if not isinstance(loss, torch.Tensor) or loss.shape not in (torch.Size([]), torch.Size([output.shape[0]])):
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"custom loss for head {self.head!r} returned shape {shape}; it must return a scalar "
                f"or one loss per labelled row, shape ({output.shape[0]},)"
            )
        return loss.mean()

    def describe(self) -> str:
        extra = ""
        if self.kind.kind == "regression" and self.builtin and self.scale != 1.0:
            extra = f" on errors / {self.scale:.3g}"
        if self.class_weight is not None:
            extra += f", class weights {[round(w, 3) for w in self.class_weight.tolist()]}"
        return f"{self.head}: {self.name}{extra} x {self.weight:g}"


class ResolvedLosses(dict):
    """Head name -> :class:`HeadLoss`; prints as a readable table."""

    def __repr__(self) -> str:
        return "\n".join(loss.describe() for loss in self.values())


def resolve(
    heads: Mapping[str, Head],
    losses: Mapping | None = None,
    weights: Mapping[str, float] | None = None,
) -> ResolvedLosses:
    """Pair every head with its loss (default by kind, or the override) and constant weight."""
    losses, weights = dict(losses or {}), dict(weights or {})
    for what, given in (("losses", losses), ("weights", weights)):
        unknown = sorted(set(given) - set(heads))
        if unknown:
            raise ValueError(f"{what} names heads {unknown} that do not exist; the heads are {sorted(heads)}")
    resolved = ResolvedLosses()
    for name, head in heads.items():
        spec = losses.get(name, head.default_loss)
        weight = weights.get(name, 1.0)
        if not isinstance(weight, int | float) or weight < 0:
            raise ValueError(f"weight for head {name!r} must be a number >= 0, got {weight!r}")
        if isinstance(spec, str):
            key = ALIASES.get(spec.lower(), spec.lower())
            if key not in REGISTRY:
                raise ValueError(f"unknown loss {spec!r} for head {name!r}; available: {sorted(REGISTRY)}")
        if head.label_smoothing and (not isinstance(spec, str) or key not in SMOOTHABLE):
            raise ValueError(
                f"label_smoothing on head {name!r} applies to the built-in losses {sorted(SMOOTHABLE)}, "
                f"not to {spec!r}; a custom loss smooths its own targets"
            )
        if isinstance(spec, str):
            if key not in SUITS[head.kind]:
                raise ValueError(
                    f"loss {spec!r} does not fit head {name!r} ({head.kind}); use one of {sorted(SUITS[head.kind])}"
                )
            # Smoothed categorical targets are [B, k] like multi-label ones, so the kind picks the form.
            fn = _focal_softmax if key == "focal" and head.kind == "categorical" else REGISTRY[key]
            resolved[name] = HeadLoss(name, head, key, fn, float(weight))
        elif callable(spec):
            label = type(spec).__name__ if isinstance(spec, torch.nn.Module) else getattr(spec, "__name__", "custom")
            resolved[name] = HeadLoss(name, head, label, spec, float(weight), builtin=False)
        else:
            raise ValueError(f"loss for head {name!r} must be a name or a callable, got {spec!r}")
    return resolved


def fit_to_data(
    resolved: ResolvedLosses,
    targets: Mapping[str, torch.Tensor],
    labelled: Mapping[str, torch.Tensor],
    scales: Mapping[str, float],
) -> None:
    """Set what each loss takes from the training targets: regression scales and class weights."""
    for name, loss in resolved.items():
        if name in scales:
            loss.scale = scales[name]
        if loss.builtin and loss.kind.class_weights is not None:
            weights = loss.kind.class_weight_vector(targets[name], labelled[name])
            loss.class_weight = None if weights is None else weights.to(targets[name].device)


def trivial_losses(
    resolved: ResolvedLosses, targets: Mapping[str, torch.Tensor], labelled: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """Each head's loss under a constant predictor (the mean, or the label prior): ``normalize=True``."""
    out = {}
    for name, loss in resolved.items():
        target = targets[name][labelled[name]]
        if target.numel() == 0:
            continue
        head = loss.kind
        if head.kind == "regression":
            constant = torch.full_like(target, float(target.mean()))
        elif head.kind in ("binary", "multilabel"):
            p = target.float().mean(dim=0).clamp(1e-4, 1 - 1e-4)
            constant = torch.log(p / (1 - p)).expand_as(target).clone()
        else:
            prior = torch.bincount(target.long(), minlength=len(head.labels)).float().clamp(min=1)
            prior = prior / prior.sum()
            if head.kind == "ordinal":  # CORN logits of the prior: P(rank > j | rank >= j)
                tail = prior.flip(0).cumsum(0).flip(0)
                p = (tail[1:] / tail[:-1]).clamp(1e-4, 1 - 1e-4)
                logits = torch.log(p / (1 - p))
            else:
                logits = prior.log()
            constant = logits.expand(len(target), -1).clone()
        with torch.no_grad():
            value = float(loss(constant, target, torch.ones(len(target), dtype=torch.bool, device=target.device)))
        out[name] = max(value, 1e-6)
    return out

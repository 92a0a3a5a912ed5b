"""Losses: a registry of per-sample losses, and the resolved loss of each head.

A head's loss is a registered name (``"mse"``, ``"mae"``, ``"huber"``, ``"bce"``,
``"cross_entropy"``, ``"focal"``, ``"corn"``, and for distribution heads ``"dldl"`` and
``"mean_variance"``), a torch loss module, or any callable
``(output, target) -> per-sample or scalar loss`` (called on labelled rows only).

    mh.fit(net, data, losses={"age": "mae", "race": my_loss})
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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


def _expectation(p: torch.Tensor) -> torch.Tensor:
    """The mean bin of distributions [B, K] over bins 0..K-1."""
    return (p * torch.arange(p.shape[1], device=p.device, dtype=p.dtype)).sum(dim=1)


def _dldl(output, target, class_weight, sigma: float = 1.0, lam: float = 1.0):
    """DLDL-v2 (Gao et al. 2018): KL from a Gaussian around the label to the prediction, plus lam x L1 of its mean.

    ``output`` holds logits over bins 0..K-1, ``target`` the label in bin units, ``sigma`` the label's spread.
    """
    bins = torch.arange(output.shape[1], device=output.device, dtype=output.dtype)
    spread = -0.5 * ((bins[None, :] - target[:, None]) / sigma).square()
    label = torch.softmax(spread, dim=1)  # the Gaussian, normalised over the bins it has
    log_q = torch.log_softmax(output, dim=1)
    kl = (label * (torch.log(label.clamp_min(1e-12)) - log_q)).sum(dim=1)
    return kl + lam * (_expectation(log_q.exp()) - target).abs()


def _mean_variance(output, target, class_weight, lam_mean: float = 0.2, lam_var: float = 0.05):
    """Mean-variance loss (Pan et al. 2018): cross-entropy on the label's bin, plus its mean and variance terms."""
    bins = torch.arange(output.shape[1], device=output.device, dtype=output.dtype)
    p = torch.softmax(output, dim=1)
    mean = _expectation(p)
    variance = (p * (bins[None, :] - mean[:, None]).square()).sum(dim=1)
    nearest = target.round().long().clamp(0, output.shape[1] - 1)
    ce = F.cross_entropy(output, nearest, reduction="none")
    return ce + lam_mean * (mean - target).square() / 2 + lam_var * variance


REGISTRY: dict[str, PerSample] = {
    "mse": _mse,
    "mae": _mae,
    "huber": _huber,
    "bce": _bce,
    "cross_entropy": _cross_entropy,
    "focal": _focal,
    "corn": _corn,
    "dldl": _dldl,
    "mean_variance": _mean_variance,
}
ALIASES = {
    "l2": "mse",
    "l1": "mae",
    "binary_crossentropy": "bce",
    "ce": "cross_entropy",
    "crossentropy": "cross_entropy",
}
VARIANTS: dict[str, PerSample] = {"focal_softmax": _focal_softmax}  # forms a head kind asks for by name


def canonical_name(name: str) -> str:
    """A loss name as the registry knows it: ``"L1"`` -> ``"mae"``."""
    return ALIASES.get(name.lower(), name.lower())


def check_suits(head: Head, head_name: str, loss: Any) -> str | None:
    """The registered key of ``loss`` for this head, or None for a callable; a clear error when it cannot apply.

    check_suits(mh.Regression(), "age", "l1")  # "mae"
    """
    key = None
    if isinstance(loss, str):
        key = canonical_name(loss)
        if key not in REGISTRY:
            raise ValueError(f"unknown loss {loss!r} for head {head_name!r}; available: {sorted(REGISTRY)}")
        if key not in head.losses:
            raise ValueError(
                f"loss {loss!r} does not fit head {head_name!r} ({head.kind}); use one of {sorted(head.losses)}"
            )
    elif not callable(loss):
        raise ValueError(f"loss for head {head_name!r} must be a name or a callable, got {loss!r}")
    if head.label_smoothing and key not in head.smoothable:
        raise ValueError(
            f"label_smoothing on head {head_name!r} applies to the built-in losses {sorted(head.smoothable)}, "
            f"not to {loss!r}; a custom loss smooths its own targets"
        )
    return key


@dataclass
class HeadLoss:
    """One head's resolved loss: what is computed and with which weight.

    ``scale`` divides regression errors (the training targets' spread) so heads share a scale;
    ``class_weight`` holds per-class weights for classifiers. ``head`` is the head kind object,
    ``head_name`` its name in the net.
    """

    head_name: str
    head: Head
    name: str
    fn: Callable
    weight: float = 1.0
    builtin: bool = True
    scale: float = 1.0
    class_weight: torch.Tensor | None = None
    options: dict = field(default_factory=dict)  # what the head kind passes its loss (e.g. a spread in bins)

    def __call__(self, output: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """Mean loss over labelled rows; 0 (not NaN) when the batch has none for this head."""
        if not self.builtin:
            return self._custom(self.head.canonical(output), target, labelled)
        output, soft = self.head.loss_inputs(output, target, self.name, self.scale)
        per_sample = self.fn(output, soft, self.class_weight, **self.options)
        mask = labelled.to(per_sample.dtype)
        weights = self.head.row_weights(target, self.class_weight)
        if weights is not None:
            mask = mask * weights
        return (per_sample * mask).sum() / mask.sum().clamp(min=1e-12)

    def _custom(self, output, target, labelled):
        output, target = output[labelled], target[labelled]
        if output.shape[0] == 0:
            return output.sum() * 0.0  # keeps the graph and adds nothing
        loss = self.fn(output, target)
        if not isinstance(loss, torch.Tensor) or loss.shape not in (torch.Size([]), torch.Size([output.shape[0]])):
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"custom loss for head {self.head_name!r} returned shape {shape}; it must return a scalar "
                f"or one loss per labelled row, shape ({output.shape[0]},)"
            )
        return loss.mean()

    def describe(self) -> str:
        extra = ""
        if self.builtin and self.scale != 1.0:
            extra = f" on errors / {self.scale:.3g}"
        if self.class_weight is not None:
            extra += f", class weights {[round(w, 3) for w in self.class_weight.tolist()]}"
        return f"{self.head_name}: {self.name}{extra} x {self.weight:g}"


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
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0 or weight == math.inf:
            raise ValueError(f"the weight of head {name!r} must be a finite number >= 0; got {weight!r}")
        key = check_suits(head, name, spec)
        if key is not None:
            variant = head.loss_variants.get(key)
            fn = VARIANTS[variant] if variant else REGISTRY[key]
            resolved[name] = HeadLoss(name, head, key, fn, float(weight), options=head.loss_options(key))
        else:
            label = type(spec).__name__ if isinstance(spec, torch.nn.Module) else getattr(spec, "__name__", "custom")
            resolved[name] = HeadLoss(name, head, label, spec, float(weight), builtin=False)
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
        if loss.builtin and loss.head.class_weights is not None:
            weights = loss.head.class_weight_vector(targets[name], labelled[name])
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
        constant = loss.head.trivial_output(target)
        with torch.no_grad():
            value = float(loss(constant, target, torch.ones(len(target), dtype=torch.bool, device=target.device)))
        out[name] = max(value, 1e-6)
    return out

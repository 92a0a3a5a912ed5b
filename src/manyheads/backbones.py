"""Backbones by name: torchvision classifiers (and timm models when installed) as feature trunks.

``pretrained=True`` goes through torchvision's weights API and its cache
(``$TORCH_HOME/hub/checkpoints``), so it works offline once the checkpoint is there.

    trunk, features = create("mobilenet_v2", pretrained=True)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

TORCHVISION = (
    "resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "mobilenet_v3_small",
    "mobilenet_v3_large", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2",
    "convnext_tiny", "convnext_small", "regnet_y_400mf", "regnet_y_800mf",
)  # fmt: skip


def _cached(weights) -> bool:
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return (hub / os.path.basename(weights.url)).exists()


def _torchvision_weights(name: str, pretrained: bool | str):
    """Resolve ``pretrained`` to a torchvision weights entry, preferring one already cached."""
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    if isinstance(pretrained, str):
        try:
            return enum[pretrained]
        except KeyError:
            raise ValueError(f"{name} has no weights {pretrained!r}; available: {[w.name for w in enum]}") from None
    candidates = [enum.DEFAULT] + [w for w in enum if w is not enum.DEFAULT]
    return next((w for w in candidates if _cached(w)), enum.DEFAULT)


def _strip_classifier(model: nn.Module) -> tuple[nn.Module, int]:
    """Replace the model's last Linear layer, and dropout beside it, by Identity: pooled features out.

    Dropout before the heads is the net's own ``dropout=`` option, the same for every backbone.
    """
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None:
        raise ValueError(f"{type(model).__name__} has no Linear classifier to remove")
    path, linear = last
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    setattr(parent, path.rsplit(".", 1)[-1], nn.Identity())
    for name, module in parent.named_children():
        if isinstance(module, nn.Dropout):
            setattr(parent, name, nn.Identity())
    return model, linear.in_features


def available() -> list[str]:
    """Backbone names known without timm (any timm model name works too when timm is installed)."""
    return list(TORCHVISION)


def create(name: str, pretrained: bool | str = False) -> tuple[nn.Module, int]:
    """A trunk returning [B, D] features and its D. ``timm:NAME`` (or any timm name) uses timm."""
    import torchvision

    if name.startswith("timm:") or name not in torchvision.models.list_models(torchvision.models):
        timm_name = name.removeprefix("timm:")
        try:
            import timm
        except ImportError:
            raise ValueError(
                f"unknown backbone {name!r}; torchvision ones: {available()} (install timm for more)"
            ) from None
        if timm_name not in timm.list_models():
            raise ValueError(f"unknown backbone {name!r}: neither torchvision nor timm has it")
        model = timm.create_model(timm_name, pretrained=bool(pretrained), num_classes=0)
        return model, model.num_features
    weights = _torchvision_weights(name, pretrained) if pretrained else None
    try:
        model = torchvision.models.get_model(name, weights=weights)
    except (OSError, RuntimeError) as error:
        raise RuntimeError(
            f"could not load pretrained weights for {name} ({error}); put {os.path.basename(weights.url)} "
            f"into {Path(torch.hub.get_dir()) / 'checkpoints'} to work offline"
        ) from error
    return _strip_classifier(model)

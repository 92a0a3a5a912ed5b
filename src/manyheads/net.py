"""MultiHeadNet: a shared trunk with one layer per named head; predict, save and load.

net = mh.MultiHeadNet("mobilenet_v2", heads, pretrained=True)
net = mh.MultiHeadNet(my_trunk, {"age": mh.Regression(), "gender": mh.Binary()})
net.save("faces.safetensors"); net = mh.load("faces.safetensors")
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from manyheads import backbones
from manyheads.checkpoint import atomic_path
from manyheads.heads import Head, HeadLayer, Regression, head_from_spec

FORMAT = "manyheads/1"
TTA_MODES = (None, "flip")


class MultiHeadNet(nn.Module):
    """A trunk mapping inputs to [B, D] features, and one head layer per entry of ``heads``.

    ``trunk`` is an ``nn.Module`` or a backbone name (see :func:`manyheads.backbones.available`).
    ``forward`` returns a dict head name -> raw output (logits for classification heads).
    ``hidden`` gives heads a hidden layer of their own (units, for all heads or ``{head: units}``;
    0: the head is one linear layer on the shared features).
    With ``outputs_dict=True`` the trunk itself returns that dict (a whole multi-output module).
    With ``tta="flip"``, in eval mode each head's raw output is the mean over the image and its
    mirror image (test-time augmentation at twice the inference cost). It is part of the net, so
    validation, ``predict``, reports, the ONNX graph and the service all answer alike.
    """

    def __init__(
        self,
        trunk: nn.Module | str,
        heads: Mapping[str, Head],
        *,
        pretrained: bool | str = False,
        image_size: int | None = None,
        dropout: float = 0.0,
        hidden: int | Mapping[str, int] = 0,
        outputs_dict: bool = False,
        tta: str | None = None,
    ) -> None:
        super().__init__()
        if not heads:
            raise ValueError("a MultiHeadNet needs at least one head")
        if tta not in TTA_MODES:
            raise ValueError(f"tta={tta!r} is not one of {TTA_MODES}")
        bad = [name for name, head in heads.items() if not isinstance(head, Head)]
        if bad:
            raise ValueError(f"heads {bad} are not head kinds (mh.Regression(), mh.Binary(), ...)")
        self.heads = dict(heads)
        self.backbone = trunk if isinstance(trunk, str) else None
        self.image_size = image_size or (128 if self.backbone else None)
        self.outputs_dict = outputs_dict
        self.dropout = dropout
        self.hidden = _hidden_per_head(hidden, heads)
        self.tta = tta
        if self.backbone:
            trunk, features = backbones.create(self.backbone, pretrained)
        else:
            features = None
        self.trunk = trunk
        self.head_layers = nn.ModuleDict()
        if not outputs_dict:
            for name, head in self.heads.items():
                self.head_layers[name] = HeadLayer(head, features, self.hidden.get(name, 0))
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's shared features [B, D]."""
        return self.trunk(x)

    def head_outputs(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each head layer applied to shared features."""
        features = self.drop(features)
        return {name: layer(features) for name, layer in self.head_layers.items()}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.tta == "flip" and not self.training:
            if x.dim() != 4:
                raise ValueError(f"tta='flip' mirrors image batches [B, C, H, W]; this input has shape {list(x.shape)}")
            n = x.shape[0]
            both = self._outputs(torch.cat([x, x.flip(3)]))  # one pass over both: better use of the device
            return {name: (out[:n] + out[n:]) / 2 for name, out in both.items()}
        return self._outputs(x)

    def _outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.outputs_dict:
            outputs = self.trunk(x)
            if not isinstance(outputs, Mapping) or set(outputs) < set(self.heads):
                found = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
                raise ValueError(f"the module must return a dict with the heads {sorted(self.heads)}; got {found}")
            return {name: outputs[name] for name in self.heads}
        return self.head_outputs(self.features(x))

    @torch.no_grad()
    def fit_target_scales(self, targets: Mapping[str, torch.Tensor], labelled: Mapping[str, torch.Tensor]) -> dict:
        """Set standardized regression heads' centre and scale from training targets (once, on a fresh net).

        Returns each such head's scale, which its loss divides errors by.
        """
        scales = {}
        for name, head in self.heads.items():
            if not isinstance(head, Regression) or not head.standardize:
                continue
            values = targets[name][labelled[name]].float()
            layer = self.head_layers[name] if name in self.head_layers else None
            if layer is not None and not layer.fitted and values.numel() >= 2:
                layer.center.fill_(values.mean())
                layer.scale.fill_(values.std().clamp(min=1e-6))
                layer.fitted.fill_(True)
            if layer is not None:
                scales[name] = float(layer.scale)
            elif values.numel() >= 2:
                scales[name] = float(values.std().clamp(min=1e-6))
        return scales

    # ---- inference ----------------------------------------------------------------------

    def prepare(self, inputs: Any) -> torch.Tensor:
        """Inputs as the float batch the net takes: images are decoded, resized and normalised."""
        from manyheads import images

        if isinstance(inputs, str | Path) or images.looks_like_images([inputs]):
            inputs = [inputs]
        if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
            return inputs
        if self.image_size is not None and images.looks_like_images(inputs):
            batch = torch.stack([images.load_rgb(item, self.image_size) for item in inputs])
            return images.normalize(batch)
        return torch.as_tensor(np.asarray(inputs, dtype=np.float32))

    @torch.no_grad()
    def _raw(self, inputs: Any, batch_size: int) -> dict[str, torch.Tensor]:
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        x = self.prepare(inputs)
        chunks = [self(x[i : i + batch_size].to(device)) for i in range(0, x.shape[0], batch_size)]
        self.train(was_training)
        return {name: torch.cat([c[name].float().cpu() for c in chunks]) for name in self.heads}

    def predict(self, inputs: Any, *, batch_size: int = 256) -> dict[str, list]:
        """Decoded predictions per head: floats for regression, label names for classifiers.

        net.predict(["face1.jpg", "face2.jpg"])  # {"age": [31.2, 8.9], "gender": [...], ...}
        """
        raw = self._raw(inputs, batch_size)
        return {name: head.decode(raw[name]) for name, head in self.heads.items()}

    def predict_proba(self, inputs: Any, *, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Per-class probabilities [N, k] for every classification head (columns follow labels)."""
        raw = self._raw(inputs, batch_size)
        probabilities = {name: head.proba(raw[name]) for name, head in self.heads.items()}
        return {name: p.numpy() for name, p in probabilities.items() if p is not None}

    # ---- files ---------------------------------------------------------------------------

    def export_onnx(self, path: str | os.PathLike, **kw: Any) -> Path:
        """Write this net as one ONNX graph (see :func:`manyheads.export.export_onnx`).

        net.export_onnx("model.onnx")
        """
        from manyheads.export import export_onnx

        return export_onnx(self, path, **kw)

    def spec(self) -> dict:
        """Everything but the weights that is needed to rebuild this net."""
        return {
            "format": FORMAT,
            "heads": {name: head.spec() for name, head in self.heads.items()},
            "backbone": self.backbone,
            "image_size": self.image_size,
            "dropout": self.dropout,
            "hidden": self.hidden,
            "outputs_dict": self.outputs_dict,
            "tta": self.tta,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write weights and head spec to one safetensors file (no pickled code), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        with atomic_path(path) as tmp:  # temporary file, fsync, rename: never a half-written model
            save_file(tensors, str(tmp), metadata={"manyheads": json.dumps(self.spec())})
        return path


def _hidden_per_head(hidden: int | Mapping[str, int], heads: Mapping[str, Head]) -> dict[str, int]:
    """Hidden units per head (only heads that have a hidden layer)."""
    per_head = dict(hidden) if isinstance(hidden, Mapping) else dict.fromkeys(heads, hidden)
    unknown = sorted(set(per_head) - set(heads))
    if unknown:
        raise ValueError(f"hidden= names heads {unknown} that the net does not have; heads: {sorted(heads)}")
    bad = {name: n for name, n in per_head.items() if isinstance(n, bool) or not isinstance(n, int) or n < 0}
    if bad:
        raise ValueError(f"hidden= must give each head a number of units >= 0 (0: no hidden layer), got {bad}")
    return {name: units for name, units in per_head.items() if units}


def read_spec(path: str | os.PathLike) -> dict:
    """The spec stored in a model file, without loading weights."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            meta = file.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path}: not a manyheads model file ({error})") from None
    if "manyheads" not in meta:
        raise ValueError(f"{path}: a safetensors file without a manyheads spec")
    return json.loads(meta["manyheads"])


def load(path: str | os.PathLike, *, trunk: nn.Module | None = None, device: str | None = None) -> MultiHeadNet:
    """Load a net saved with :meth:`MultiHeadNet.save`; nothing in the file is executed.

    Nets built on a custom trunk need that trunk's (untrained) module passed as ``trunk``.

        net = mh.load("faces.safetensors")
    """
    from safetensors.torch import load_file

    spec = read_spec(path)
    heads = {name: head_from_spec(h) for name, h in spec["heads"].items()}
    if spec["backbone"] is None and trunk is None:
        raise ValueError(f"{path} was built on a custom trunk; pass it: mh.load(path, trunk=MyTrunk())")
    net = MultiHeadNet(
        spec["backbone"] or trunk,
        heads,
        image_size=spec["image_size"],
        dropout=spec.get("dropout", 0.0),
        hidden=spec.get("hidden", 0),
        outputs_dict=spec.get("outputs_dict", False),
        tta=spec.get("tta"),
    )
    state = load_file(str(path))
    net.load_state_dict(state)
    if device:
        net.to(device)
    return net.eval()

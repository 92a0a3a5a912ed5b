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
from manyheads.heads import Head, head_from_spec

FORMAT = "manyheads/1"
TTA_MODES = (None, "flip")
MAX_IMAGE_SIZE = 4096  # pixels a side: beyond it one uint8 image is over 50 MB, a spec error rather than a model
RESERVED = {"total"}  # history's pseudo-head of the weighted total loss


def _check_image_size(size: Any) -> None:
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= MAX_IMAGE_SIZE):
        raise ValueError(f"image_size must be a whole number of pixels in [8, {MAX_IMAGE_SIZE}]; got {size!r}")


def _check_head_name(name: Any) -> None:
    """Head names become history columns (``val/NAME/mae``) and file names (``best_NAME.safetensors``)."""
    if not isinstance(name, str) or not name or name in RESERVED or name.startswith("."):
        raise ValueError(f"head name {name!r} is not allowed: use a non-empty name, not {sorted(RESERVED)} or '.'-led")
    if any(ch in name for ch in "/\\\0") or name != name.strip():
        raise ValueError(f"head name {name!r} is not allowed: no '/', '\\', NUL or surrounding spaces")


class HeadLayer(nn.Module):
    """The layer a :class:`MultiHeadNet` puts on the shared features for one head.

    With ``hidden`` units, a hidden layer and ReLU of the head's own (a "tower") come first:
    capacity for this head alone on top of the shared features. For a standardized head (see
    ``Head.target_scale``) it holds the training targets' centre and scale as buffers, so the
    output is in the target's own units while the linear layer works near unit scale.
    """

    def __init__(self, head: Head, in_features: int | None, hidden: int = 0) -> None:
        super().__init__()
        # Lazy when the trunk's feature size is unknown: fit materialises it with one dry batch.
        if hidden:
            first = nn.Linear(in_features, hidden) if in_features else nn.LazyLinear(hidden)
            self.tower = nn.Sequential(first, nn.ReLU())
            in_features = hidden
        else:
            self.tower = nn.Identity()
        out = head.out_features
        self.linear = nn.Linear(in_features, out) if in_features else nn.LazyLinear(out)
        self.squeeze = head.squeeze
        self.affine = head.standardized
        self.register_buffer("center", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))  # centre/scale set from data

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.linear(self.tower(features))
        if self.squeeze:
            out = out.squeeze(-1)
        if self.affine:
            out = out * self.scale + self.center
        return out


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
        for name in heads:
            _check_head_name(name)
        _check_image_size(image_size)
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
        """Set standardized heads' centre and scale from training targets (once, on a fresh net).

        Returns each such head's scale, which its loss divides errors by.
        """
        scales = {}
        for name, head in self.heads.items():
            if not head.standardized:
                continue
            layer = self.head_layers[name] if name in self.head_layers else None
            if layer is not None and bool(layer.fitted):
                scales[name] = float(layer.scale)
                continue
            fitted = head.target_scale(targets[name][labelled[name]].float())
            if fitted is None:
                continue
            if layer is not None:
                layer.center.fill_(fitted[0])
                layer.scale.fill_(fitted[1])
                layer.fitted.fill_(True)
            scales[name] = fitted[1]
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

    def _raw(self, inputs: Any, batch_size: int) -> dict[str, torch.Tensor]:
        from manyheads.inference import raw_outputs

        outputs = raw_outputs(self, self.prepare(inputs), batch_size=batch_size)
        return {name: out.cpu() for name, out in outputs.items()}

    def predict(self, inputs: Any, *, batch_size: int = 256) -> dict[str, list]:
        """Decoded predictions per head: floats for regression, label names for classifiers.

        net.predict(["face1.jpg", "face2.jpg"])  # {"age": [31.2, 8.9], "gender": [...], ...}

        A calibrated head also answers its extras beside the value: ``"age_interval"`` (a
        [low, high] per row) and, with an abstention threshold, ``"gender_uncertain"``.
        """
        raw = self._raw(inputs, batch_size)
        return answers_by_head(self.heads, {name: head.readout(raw[name]).numpy() for name, head in self.heads.items()})

    def predict_proba(self, inputs: Any, *, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Per-class probabilities [N, k] for every classification head (columns follow labels)."""
        raw = self._raw(inputs, batch_size)
        probabilities = {name: head.proba(raw[name]) for name, head in self.heads.items()}
        return {name: p.numpy() for name, p in probabilities.items() if p is not None}

    # ---- files ---------------------------------------------------------------------------

    def spec(self) -> dict:
        """Everything but the weights that is needed to rebuild this net."""
        return {
            "format": FORMAT,
            "heads": {name: head.file_spec() for name, head in self.heads.items()},
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


def answers_by_head(heads: Mapping[str, Head], readouts: Mapping[str, np.ndarray]) -> dict[str, list]:
    """Decoded answers per head from read-outs, and each calibrated head's extras as ``NAME_KEY`` entries."""
    answers: dict[str, list] = {}
    for name, head in heads.items():
        answers[name] = head.decode_readout(readouts[name])
        answers |= {f"{name}_{key}": column for key, column in head.extras(readouts[name]).items() if key}
    return answers


def set_coverage(model: Any, coverage: float) -> None:
    """Answer every calibrated number's interval at ``coverage`` (a net, an OnnxModel's heads, or a dict of heads).

    set_coverage(net, 0.8)  # 80 % intervals from the stored calibration scores
    """
    heads = model if isinstance(model, Mapping) else model.heads
    for head in heads.values():
        head.set_coverage(coverage)


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
    """The spec stored in a model file, without loading weights; a damaged one is named, field and all."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            meta = file.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path}: not a manyheads model file ({error})") from None
    if "manyheads" not in meta:
        raise ValueError(f"{path}: a safetensors file without a manyheads spec")
    try:
        spec = json.loads(meta["manyheads"])
    except ValueError:
        raise ValueError(f"{path}: the model spec is not valid JSON; the file is damaged") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: the model spec is a {type(spec).__name__}, not a mapping; the file is damaged")
    if not isinstance(spec.get("heads"), dict) or not spec["heads"]:
        raise ValueError(f"{path}: the model spec's 'heads' field must map head names to head specs")
    return spec


def _net_from_spec(spec: dict, trunk: nn.Module | None) -> MultiHeadNet:
    heads = {name: head_from_spec(h, name) for name, h in spec["heads"].items()}
    backbone = spec.get("backbone")
    if backbone is not None and not isinstance(backbone, str):
        raise ValueError(f"the 'backbone' field must be a backbone name or null, got {backbone!r}")
    if backbone is None and trunk is None:
        raise ValueError("it was built on a custom trunk; pass it: mh.load(path, trunk=MyTrunk())")
    return MultiHeadNet(
        backbone or trunk,
        heads,
        image_size=spec.get("image_size"),
        dropout=spec.get("dropout", 0.0),
        hidden=spec.get("hidden", 0),
        outputs_dict=spec.get("outputs_dict", False),
        tta=spec.get("tta"),
    )


def load(path: str | os.PathLike, *, trunk: nn.Module | None = None, device: str | None = None) -> MultiHeadNet:
    """Load a net saved with :meth:`MultiHeadNet.save`; nothing in the file is executed.

    Nets built on a custom trunk need that trunk's (untrained) module passed as ``trunk``. A damaged
    or inconsistent file, or one whose weights are not finite, is refused with the file and field named.

        net = mh.load("faces.safetensors")
    """
    from safetensors.torch import load_file

    spec = read_spec(path)
    try:
        net = _net_from_spec(spec, trunk)
    except (TypeError, KeyError, ValueError) as error:
        raise ValueError(f"{path}: the model spec does not describe a net this version can build: {error}") from None
    state = load_file(str(path))
    try:
        net.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0:2]
        raise ValueError(f"{path}: the weights do not fit the net its spec describes ({' '.join(first)})") from None
    for name, layer in net.head_layers.items():  # lazy layers take any shape a file gives them: compare
        if layer.linear.weight.shape[0] != net.heads[name].out_features:
            raise ValueError(
                f"{path}: the weights do not fit the net its spec describes (head {name!r} has "
                f"{layer.linear.weight.shape[0]} outputs, its spec {net.heads[name].out_features})"
            )
    broken = [key for key, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise ValueError(f"{path}: the weights hold NaN or inf (in {broken[:3]}); this model cannot answer. "
                         f"Retrain it, or load an earlier checkpoint")  # fmt: skip
    if device:
        net.to(device)
    return net.eval()

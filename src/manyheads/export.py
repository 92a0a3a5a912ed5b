"""ONNX export of a MultiHeadNet, and :class:`OnnxModel` to run such a file with onnxruntime.

The graph takes what a client has at hand and returns what it wants, so the file alone is enough:

* image nets: input ``image``, uint8 [N, 3, S, S] RGB (S = ``net.image_size``). The caller resizes
  (``manyheads.images.load_rgb(item, S)``: shorter side to S, centre square); the ImageNet
  mean/std normalisation is inside the graph. Other nets: float input ``input`` [N, ...].
* one output per head, named after it: regression values [N]; class probabilities [N, k] for
  binary ([p0, p1]), categorical and ordinal heads; per-label sigmoids [N, k] for multilabel.
  Calibration is inside the graph: classifier probabilities are temperature-scaled, and a
  calibrated number answers [N, 3] (value, interval low, interval high) at the coverage it was
  exported with (``outputs_with_interval`` in the io metadata lists those heads).
* the batch size is dynamic; ``net.spec()`` (head kinds and labels) is in the metadata under
  ``manyheads``, a description of input and outputs under ``manyheads.io``.

    export_onnx(net, "faces.onnx"); OnnxModel("faces.onnx").predict(["face.jpg"])
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from manyheads import images
from manyheads.heads import Head, head_from_spec
from manyheads.net import MultiHeadNet, answers_by_head

SPEC_KEY = "manyheads"
IO_KEY = "manyheads.io"


class _Graph(nn.Module):
    """The net plus its input normalisation and each head's probabilities, as one module to trace."""

    def __init__(self, net: MultiHeadNet) -> None:
        super().__init__()
        self.net = net
        self.image = net.image_size is not None
        self.register_buffer("mean", torch.tensor(images.IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(images.IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.image:  # the same arithmetic as images.normalize, so outputs match to float rounding
            x = (x.float().div(255) - self.mean) / self.std
        raw = self.net(x)
        return tuple(head.readout(raw[name]) for name, head in self.net.heads.items())


def _probe(head: Head) -> np.ndarray:
    """A one-row read-out of the shape the head's graph output has, to ask the head what it answers."""
    return np.asarray(head.readout(torch.zeros(1, head.out_features)).detach().cpu())


def _example(net: MultiHeadNet, example: torch.Tensor | None) -> torch.Tensor:
    device = next(net.parameters()).device
    if example is not None:
        return example.to(device)
    if net.image_size is not None:
        return torch.zeros(2, 3, net.image_size, net.image_size, dtype=torch.uint8, device=device)
    linears = (m for m in net.trunk.modules() if isinstance(m, nn.Linear))
    first = next((m for m in linears if not isinstance(m.weight, nn.parameter.UninitializedParameter)), None)
    if first is None:
        raise ValueError("cannot tell this net's input shape; pass an example batch: export_onnx(net, path, example=x)")
    return torch.zeros(2, first.in_features, device=device)


def _torch_export(module: nn.Module, x: torch.Tensor, path: Path, names: list[str], input_name: str, opset: int):
    kwargs: dict[str, Any] = {}
    # The classic (TorchScript) exporter exists in every torch >= 2.4 and needs no onnxscript; torch >= 2.5
    # takes `dynamo=` and newer ones default it to True, so ask for the classic one explicitly.
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    axes = {name: {0: "batch"} for name in [input_name, *names]}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            module, (x,), str(path), input_names=[input_name], output_names=names,
            dynamic_axes=axes, opset_version=opset, do_constant_folding=True, **kwargs,
        )  # fmt: skip


def export_onnx(
    net: MultiHeadNet, path: str | os.PathLike, *, opset: int = 17, example: torch.Tensor | None = None
) -> Path:
    """Write ``net`` as one ONNX graph (see the module docstring for inputs, outputs and metadata).

    ``example`` is a batch of inputs, only needed for non-image nets whose input size cannot be
    read off the trunk's first Linear layer.

        export_onnx(mh.load("run/model.safetensors"), "model.onnx")
    """
    import onnx

    path = Path(path)
    input_name = "image" if net.image_size is not None else "input"
    names = list(net.heads)
    if input_name in names:
        raise ValueError(f"head {input_name!r} has the name of the graph's input; rename the head to export it")
    x = _example(net, example)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(images.normalize(x) if input_name == "image" else x)  # materialises lazy head layers
            _torch_export(_Graph(net).to(x.device).eval(), x, path, names, input_name, opset)
    finally:
        net.train(was_training)
    model = onnx.load(str(path))
    shape = ["N", *x.shape[1:]]
    kind = {name: head.readout_kind for name, head in net.heads.items()}
    io = {
        "input": {"name": input_name, "dtype": "uint8" if input_name == "image" else "float32", "shape": shape},
        "outputs": kind,
        "outputs_with_interval": [name for name, head in net.heads.items() if "interval" in head.extras(_probe(head))],
        "preprocess": "RGB, shorter side resized to image_size (bicubic), centre square; see images.load_rgb"
        if input_name == "image"
        else "none",
    }
    for key, value in ((SPEC_KEY, net.spec()), (IO_KEY, io)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    model.doc_string = "manyheads MultiHeadNet: " + ", ".join(f"{n} ({h.kind})" for n, h in net.heads.items())
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


class OnnxModel:
    """An exported net run by onnxruntime, with ``MultiHeadNet``'s ``predict`` / ``predict_proba``.

    m = OnnxModel("model.onnx"); m.predict(["face.jpg"])  # {"age": [31.2], "gender": ["female"]}
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types for unreadable files
            raise ValueError(f"{path}: cannot load as an ONNX model ({error})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if SPEC_KEY not in meta:
            raise ValueError(f"{path}: an ONNX file without a manyheads spec; export it with manyheads.export_onnx")
        self.path = Path(path)
        self._spec = json.loads(meta[SPEC_KEY])
        self.heads: dict[str, Head] = {name: head_from_spec(h) for name, h in self._spec["heads"].items()}
        self.image_size: int | None = self._spec.get("image_size")
        self.input_name = self.session.get_inputs()[0].name

    def spec(self) -> dict:
        """The exported net's spec (as ``MultiHeadNet.spec()``)."""
        return dict(self._spec)

    def prepare(self, inputs: Any) -> np.ndarray:
        """Inputs as the graph takes them: images become uint8 [N, 3, S, S], other inputs float32."""
        if isinstance(inputs, str | Path) or images.looks_like_images([inputs]):
            inputs = [inputs]
        if isinstance(inputs, torch.Tensor):
            inputs = inputs.detach().cpu().numpy()
        if self.image_size is None:
            return np.asarray(inputs, dtype=np.float32)
        if isinstance(inputs, np.ndarray) and inputs.dtype == np.uint8 and inputs.ndim == 4:
            return inputs
        return np.stack([images.load_rgb(item, self.image_size).numpy() for item in inputs])

    def outputs(self, inputs: Any, *, batch_size: int = 256) -> dict[str, np.ndarray]:
        """The graph's outputs per head: regression values [N], probabilities [N, k]."""
        x = self.prepare(inputs)
        if len(x) == 0:
            raise ValueError("no inputs to predict on")
        names = list(self.heads)
        chunks = [
            self.session.run(names, {self.input_name: x[i : i + batch_size]}) for i in range(0, len(x), batch_size)
        ]
        return {name: np.concatenate([c[j] for c in chunks]) for j, name in enumerate(names)}

    def predict(self, inputs: Any, *, batch_size: int = 256) -> dict[str, list]:
        """Decoded predictions per head: floats for regression, label names for classifiers."""
        return answers_by_head(self.heads, self.outputs(inputs, batch_size=batch_size))

    def predict_proba(self, inputs: Any, *, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Per-class probabilities [N, k] for every classification head (columns follow labels)."""
        out = self.outputs(inputs, batch_size=batch_size)
        return {name: out[name] for name, head in self.heads.items() if head.readout_kind == "probabilities"}

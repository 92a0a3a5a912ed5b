"""Inference: the one batched pass of a net over encoded rows, and per-head scores from it.

Training-time validation, the evaluation report, ``compare``'s test scores, ``predict``, the
service and export all run the net through :func:`raw_outputs`; :func:`score` turns those outputs
into the history's ``split/head/metric`` columns.

    row = score(net, encoded, losses, prefix="val")  # {"val/age/loss": ..., "val/age/mae": ..., ...}
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import torch

from manyheads import columns, encoding


@torch.no_grad()
def raw_outputs(
    net: torch.nn.Module,
    data: encoding.Encoded | torch.Tensor,
    *,
    batch_size: int = 256,
    autocast: Any = None,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Each head's raw output (float32, in row order, on the net's device) in eval mode.

    ``data`` is an encoded set (images are normalised on the device as in training) or a float
    batch the net takes as it is.

        out = raw_outputs(net, encoded)["age"]
    """
    was = net.training
    net.eval()
    device = device or next(net.parameters()).device
    if isinstance(data, torch.Tensor):
        batches = (data[i : i + batch_size].to(device) for i in range(0, data.shape[0], batch_size))
    else:
        batches = (x for x, _, _ in encoding.Batches(data, batch_size, device, shuffle=False).epoch(0))
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in net.heads}
    try:
        for x in batches:
            with autocast or contextlib.nullcontext():
                out = net(x)
            for name in chunks:
                chunks[name].append(out[name].float())
    finally:
        net.train(was)
    return {name: torch.cat(parts) if parts else torch.empty(0, device=device) for name, parts in chunks.items()}


def score(
    net: torch.nn.Module,
    data: encoding.Encoded,
    losses: Mapping,
    weights: Mapping[str, float] | None = None,
    *,
    batch_size: int = 256,
    autocast: Any = None,
    prefix: str = "val",
) -> dict[str, float]:
    """Loss and metrics per head, and the weighted total loss, over an encoded set in one pass."""
    outputs = raw_outputs(net, data, batch_size=batch_size, autocast=autocast)
    row: dict[str, float] = {}
    total = 0.0
    for name, head in net.heads.items():
        out = outputs[name]
        target, labelled = data.targets[name].to(out.device), data.labelled[name].to(out.device)
        loss = float(losses[name](out, target, labelled)) if labelled.any() else float("nan")
        row[columns.name(prefix, name, "loss")] = loss
        row[columns.name(prefix, name, "labels")] = int(labelled.sum())
        for key, value in head.metrics(out[labelled], target[labelled]).items():
            row[columns.name(prefix, name, key)] = value
        total += (weights or {}).get(name, 1.0) * (0.0 if math.isnan(loss) else loss)
    row[columns.name(prefix, columns.TOTAL, "loss")] = total
    return row


def encode_for(
    net: torch.nn.Module, data: Any, *, inputs: str | None = None, on_bad: str = "error"
) -> encoding.Encoded:
    """A labelled table (a dict of columns, a DataFrame or a Dataset) encoded as ``net`` takes it.

    Its heads' columns become targets and its input column the inputs, at the net's image size.

        encoded = encode_for(net, test_df, on_bad="skip"); outputs = raw_outputs(net, encoded)
    """
    table = encoding.columns_of(data, "evaluation data")
    input_name = encoding.input_column(table, net.heads, inputs)
    return encoding.encode(table, net.heads, input_name, image_size=getattr(net, "image_size", None), on_bad=on_bad)


def evaluate(
    net: torch.nn.Module,
    data: Any,
    *,
    inputs: str | None = None,
    batch_size: int = 256,
    on_bad: str = "error",
) -> dict[str, dict[str, float]]:
    """Each head's metrics on a labelled table (a dict of columns, a DataFrame or a Dataset), like ``predict``.

    Every head is scored on the rows labelled for it; ``labels`` says how many that was.

        mh.evaluate(net, test_df)  # {"age": {"mae": 4.8, "rmse": 6.6, "labels": 3029}, "gender": {...}}
    """
    encoded = encode_for(net, data, inputs=inputs, on_bad=on_bad)
    outputs = raw_outputs(net, encoded, batch_size=batch_size)
    scores = {}
    for name, head in net.heads.items():
        labelled = encoded.labelled[name].to(outputs[name].device)
        target = encoded.targets[name].to(labelled.device)[labelled]
        scores[name] = {**head.metrics(outputs[name][labelled], target), "labels": int(labelled.sum())}
    return scores


def calibrate(
    net: torch.nn.Module,
    data: Any,
    *,
    coverage: float = 0.9,
    interval: str = "adaptive",
    abstain: Mapping[str, float] | None = None,
    inputs: str | None = None,
    batch_size: int = 256,
    on_bad: str = "error",
) -> dict[str, dict[str, float]]:
    """Calibrate every head of a trained net on held-out labelled rows; the net then answers calibrated.

    Classifier heads get a temperature (their probabilities become trustworthy, their answers stay
    the same); numbers get a split-conformal interval at ``coverage``, ``interval="adaptive"`` (width
    following the input) or ``"plain"`` (one width). ``abstain`` maps heads to a threshold: a top
    probability below it (a classifier) or an interval wider than it (a number) is marked uncertain.
    The calibration is saved with the net (``net.save``) and answered by ``predict``, ONNX and the service.
    Use rows the net was not trained on: the validation rows, or a split of their own.

        mh.calibrate(net, calibration_df)  # {"gender": {"temperature": 1.31, ...}, "age": {"coverage": 0.9, ...}}
    """
    unknown = sorted(set(abstain or {}) - set(net.heads))
    if unknown:
        raise ValueError(f"abstain= names heads {unknown} that the net does not have; heads: {sorted(net.heads)}")
    encoded = data if isinstance(data, encoding.Encoded) else encode_for(net, data, inputs=inputs, on_bad=on_bad)
    outputs = raw_outputs(net, encoded, batch_size=batch_size)
    summary = {}
    for name, head in net.heads.items():
        labelled = encoded.labelled[name].to(outputs[name].device)
        if not labelled.any():
            continue  # nothing to calibrate this head on: it answers as trained
        target = encoded.targets[name].to(labelled.device)[labelled]
        options = {"coverage": coverage, "interval": interval, "abstain": (abstain or {}).get(name)}
        try:
            fitted = head.calibrate(outputs[name][labelled], target, **options)
        except ValueError as error:
            raise ValueError(f"head {name!r}: {error}") from None
        if fitted is not None:
            summary[name] = {**fitted, "labels": int(labelled.sum())}
    return summary

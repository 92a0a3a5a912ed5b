"""Head kinds: what each output of a multi-head net predicts, and how.

A head kind knows its output size, its default loss, how to encode a column of targets
(with missing labels) into tensors, how to decode raw outputs back into values, and which
metrics describe it. Kinds are plain specs; the layers live in :class:`manyheads.MultiHeadNet`.

    heads = {"age": mh.Regression(), "gender": mh.Binary(["male", "female"]),
             "race": mh.Categorical(["White", "Black", "Asian", "Indian", "Others"])}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from manyheads.metrics import head_metrics

Encoded = tuple[torch.Tensor, torch.Tensor]  # (target, labelled mask)
_NAN, _UNKNOWN = "label not a number", "label not in the head's labels"  # short reasons skip counts group by


def is_missing(value: Any) -> bool:
    """True for the values that mean "not labelled for this head": None, NaN, pd.NA, NaT."""
    if value is None:
        return True
    if isinstance(value, float | np.floating):
        return math.isnan(value)
    try:
        import pandas as pd

        return value is pd.NA or value is pd.NaT
    except ImportError:  # pragma: no cover - pandas is a dependency
        return False


class LabelError(ValueError):
    """A target value a head cannot encode; ``kind`` is the short reason that skip counts group by."""

    def __init__(self, message: str, kind: str = "bad label") -> None:
        super().__init__(message)
        self.kind = kind


class Reason(str):
    """A skip reason (the full message) that also carries its short ``kind``, e.g. "label not a number"."""

    kind: str

    def __new__(cls, message: str, kind: str = "bad label") -> Reason:
        reason = super().__new__(cls, message)
        reason.kind = kind
        return reason


def _row_error(head: str, column: str, row: int, message: str, kind: str = "bad label") -> LabelError:
    return LabelError(f"head {head!r}, column {column!r}, row {row}: {message}", kind)


def _as_list(values: Any) -> list:
    if isinstance(values, torch.Tensor):
        return values.tolist()
    if isinstance(values, np.ndarray):
        return list(values)
    return list(values)


class Head:
    """Base of all head kinds. Subclasses set ``kind``, ``default_loss`` and the codecs."""

    kind: str = ""
    default_loss: str = ""
    labels: list | None = None
    class_weights: str | Mapping | None = None
    label_smoothing: float = 0.0

    @property
    def out_features(self) -> int:
        return 1

    def encode(
        self,
        values: Any,
        *,
        name: str = "?",
        column: str | None = None,
        bad: dict | None = None,
        row_numbers: Sequence[int] | None = None,
    ) -> Encoded:
        """Encode a column into ``(target, labelled)``; missing labels get a placeholder.

        A value that cannot be encoded raises ``ValueError`` naming head, column and row, or,
        when a ``bad`` dict is given, is recorded there (position -> reason, a :class:`Reason`
        str) and left unlabelled. Messages name ``row_numbers[position]`` when given (the row
        in the user's table when ``values`` is a part of it), else the position.
        """
        values = _as_list(values)
        column = column or name
        targets, labelled = [], []
        for row, value in enumerate(values):
            try:
                if is_missing(value):
                    raise LookupError
                targets.append(self._encode_one(value, name, column, row if row_numbers is None else row_numbers[row]))
                labelled.append(True)
            except LookupError:
                targets.append(self._placeholder())
                labelled.append(False)
            except ValueError as error:
                if bad is None:
                    raise
                bad.setdefault(row, Reason(str(error), getattr(error, "kind", "bad label")))
                targets.append(self._placeholder())
                labelled.append(False)
        target = torch.tensor(np.array(targets), dtype=self._target_dtype)
        if not values:
            target = target.reshape(0, *self._target_shape())
        return target, torch.tensor(labelled, dtype=torch.bool)

    def canonical(self, output: torch.Tensor) -> torch.Tensor:
        """Bring a raw output to this kind's shape: [B] for one-logit heads, [B, k] otherwise."""
        if self.out_features == 1:
            return output.reshape(output.shape[0])
        return output.reshape(output.shape[0], self.out_features)

    def proba(self, output: torch.Tensor) -> torch.Tensor | None:
        """Per-class probabilities, or None for heads that are not classifiers."""
        return None

    def readout(self, output: torch.Tensor) -> torch.Tensor:
        """What a deployed head answers: class probabilities for classifiers, values for regression."""
        p = self.proba(output)
        return self.canonical(output).float() if p is None else p

    def decode(self, output: torch.Tensor) -> list:
        """Turn raw outputs into user-facing values (floats or label names)."""
        raise NotImplementedError

    def metrics(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """Metrics on labelled rows only (rows already selected)."""
        return head_metrics(self, output, target)

    def spec(self) -> dict:
        """A JSON-safe description, enough to rebuild the head with :func:`head_from_spec`."""
        spec = {"kind": self.kind}
        if self.labels is not None:
            spec["labels"] = list(self.labels)
        if isinstance(self.class_weights, str | Mapping):
            spec["class_weights"] = (
                self.class_weights if isinstance(self.class_weights, str) else dict(self.class_weights)
            )
        if self.label_smoothing:
            spec["label_smoothing"] = self.label_smoothing
        return spec

    def __repr__(self) -> str:
        args = "" if self.labels is None else repr(list(self.labels))
        return f"{type(self).__name__}({args})"

    def _placeholder(self) -> Any:
        return 0

    def _target_shape(self) -> tuple[int, ...]:
        return ()

    _target_dtype = torch.float32

    def _encode_one(self, value: Any, name: str, column: str, row: int) -> Any:
        raise NotImplementedError


class Regression(Head):
    """A scalar output (e.g. age in years). Default loss ``"mse"``; metrics MAE and RMSE.

    With ``standardize=True`` (default) the head layer predicts in units of the training
    targets' spread and maps back, so a target in years trains as easily as one near 0.
    ``min`` / ``max`` bound valid targets: a value outside is a bad row (an error, or skipped
    with ``on_bad="skip"``), e.g. a negative age.

        mh.Regression(min=0, max=120)
    """

    kind = "regression"
    default_loss = "mse"

    def __init__(self, *, standardize: bool = True, min: float | None = None, max: float | None = None) -> None:
        if min is not None and max is not None and min > max:
            raise ValueError(f"Regression(min={min}, max={max}): min must not exceed max")
        self.standardize = standardize
        self.min, self.max = min, max

    def _encode_one(self, value: Any, name: str, column: str, row: int) -> float:
        if isinstance(value, bool | np.bool_) or isinstance(value, str):
            raise _row_error(name, column, row, f"regression target must be a number, got {value!r}", _NAN)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise _row_error(name, column, row, f"regression target must be a number, got {value!r}", _NAN) from None
        if not math.isfinite(number):
            raise _row_error(name, column, row, f"regression target must be finite, got {value!r}", "label not finite")
        if (self.min is not None and number < self.min) or (self.max is not None and number > self.max):
            bounds = f"[{'-inf' if self.min is None else self.min}, {'inf' if self.max is None else self.max}]"
            raise _row_error(name, column, row, f"{value!r} is outside {bounds}", f"label outside {bounds}")
        return number

    def decode(self, output: torch.Tensor) -> list:
        return self.canonical(output).float().tolist()

    def spec(self) -> dict:
        bounds = {key: value for key, value in (("min", self.min), ("max", self.max)) if value is not None}
        return {**super().spec(), "standardize": self.standardize, **bounds}

    def __repr__(self) -> str:
        args = [] if self.standardize else ["standardize=False"]
        args += [f"{key}={value!r}" for key, value in (("min", self.min), ("max", self.max)) if value is not None]
        return f"Regression({', '.join(args)})"


class _Classifier(Head):
    """Shared code of heads whose targets are label names or class indices."""

    def __init__(
        self, labels: Sequence, class_weights: str | Mapping | None = None, *, label_smoothing: float = 0.0
    ) -> None:
        labels = list(labels)
        if len(labels) < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 labels, got {labels!r}")
        if len(set(map(str, labels))) != len(labels):
            raise ValueError(f"{type(self).__name__} labels must be distinct, got {labels!r}")
        if isinstance(class_weights, str) and class_weights != "balanced":
            raise ValueError(f"class_weights must be 'balanced' or a mapping label -> weight, got {class_weights!r}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.labels = labels
        self.class_weights = class_weights
        self.label_smoothing = float(label_smoothing)
        self._index = {self._key(label): i for i, label in enumerate(labels)}

    @staticmethod
    def _key(value: Any) -> Any:
        return value.item() if isinstance(value, np.generic) else value

    def _class_index(self, value: Any, name: str, column: str, row: int) -> int:
        value = self._key(value)
        if isinstance(value, bool):
            value = int(value)
        try:
            if value in self._index:
                return self._index[value]
        except TypeError:  # unhashable, e.g. a list in a single-label column
            message = f"expected one label of {self.labels!r}, got a {type(value).__name__}: {value!r}"
            raise _row_error(name, column, row, message, "label of the wrong type") from None
        by_index = not any(isinstance(label, int | float) for label in self.labels) or self.labels == [0, 1]
        if by_index and isinstance(value, int | float) and float(value).is_integer() and 0 <= value < len(self.labels):
            return int(value)
        raise _row_error(
            name,
            column,
            row,
            f"{value!r} is not one of the head's labels {self.labels!r} (or an index below {len(self.labels)})",
            _UNKNOWN,
        )

    def class_weight_vector(self, target: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor | None:
        """Per-class weights from ``class_weights`` ("balanced" uses the labelled counts)."""
        if self.class_weights is None:
            return None
        k = len(self.labels)
        if self.class_weights == "balanced":
            counts = torch.bincount(target[labelled].long().reshape(-1), minlength=k).float()
            return counts.sum() / (k * counts.clamp(min=1))
        unknown = [key for key in self.class_weights if self._key(key) not in self._index]
        if unknown:
            raise ValueError(f"class_weights names labels {unknown!r} that are not in {self.labels!r}")
        weights = torch.ones(k)
        for label, weight in self.class_weights.items():
            weights[self._index[self._key(label)]] = float(weight)
        return weights


class Binary(_Classifier):
    """One logit with a sigmoid. Default loss ``"bce"``; metrics accuracy and AUROC.

    Targets may be 0/1, booleans or one of two ``labels`` (the second label is class 1).

        mh.Binary(["male", "female"])
    """

    kind = "binary"
    default_loss = "bce"

    def __init__(
        self,
        labels: Sequence | None = None,
        *,
        class_weights: str | Mapping | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__([0, 1] if labels is None else labels, class_weights, label_smoothing=label_smoothing)
        if len(self.labels) != 2:
            raise ValueError(f"Binary takes exactly 2 labels, got {self.labels!r}")
        self._named = labels is not None

    def _encode_one(self, value: Any, name: str, column: str, row: int) -> float:
        return float(self._class_index(value, name, column, row))

    def proba(self, output: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(self.canonical(output).float())
        return torch.stack([1 - p, p], dim=1)

    def decode(self, output: torch.Tensor) -> list:
        positive = (self.canonical(output) > 0).tolist()
        return [self.labels[int(p)] for p in positive] if self._named else [bool(p) for p in positive]

    def spec(self) -> dict:
        spec = super().spec()
        if not self._named:
            del spec["labels"]
        return spec

    def __repr__(self) -> str:
        return f"Binary({self.labels!r})" if self._named else "Binary()"


class Categorical(_Classifier):
    """k logits with a softmax. Default loss ``"cross_entropy"``; metrics accuracy and macro-F1.

    ``label_smoothing`` (also on Binary and MultiLabel) trains towards ``1 - e`` on the true class
    and spreads ``e`` over all classes, as torch's ``cross_entropy(label_smoothing=e)``.

        mh.Categorical(["White", "Black", "Asian", "Indian", "Others"], class_weights="balanced", label_smoothing=0.1)
    """

    kind = "categorical"
    default_loss = "cross_entropy"
    _target_dtype = torch.int64

    @property
    def out_features(self) -> int:
        return len(self.labels)

    def _encode_one(self, value: Any, name: str, column: str, row: int) -> int:
        return self._class_index(value, name, column, row)

    def proba(self, output: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.canonical(output).float(), dim=1)

    def decode(self, output: torch.Tensor) -> list:
        return [self.labels[i] for i in self.canonical(output).argmax(dim=1).tolist()]


class Ordinal(Categorical):
    """Ordered classes (e.g. age bins). Default loss ``"corn"``; metrics accuracy and MAE in bins.

    Outputs k - 1 logits, one per threshold "rank > j" (CORN, Shi et al. 2021).

        mh.Ordinal(["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+"])
    """

    kind = "ordinal"
    default_loss = "corn"

    @property
    def out_features(self) -> int:
        return len(self.labels) - 1

    def canonical(self, output: torch.Tensor) -> torch.Tensor:
        return output.reshape(output.shape[0], self.out_features)

    def proba(self, output: torch.Tensor) -> torch.Tensor:
        # CORN: conditional probabilities chain into P(rank > j); differences give class probabilities.
        above = torch.cumprod(torch.sigmoid(self.canonical(output).float()), dim=1)
        ones = torch.ones_like(above[:, :1])
        zeros = torch.zeros_like(above[:, :1])
        return torch.cat([ones, above], dim=1) - torch.cat([above, zeros], dim=1)

    def rank(self, output: torch.Tensor) -> torch.Tensor:
        """Predicted class index: the number of thresholds passed."""
        above = torch.cumprod(torch.sigmoid(self.canonical(output).float()), dim=1)
        return (above > 0.5).sum(dim=1)

    def decode(self, output: torch.Tensor) -> list:
        return [self.labels[i] for i in self.rank(output).tolist()]


class MultiLabel(_Classifier):
    """k independent sigmoids; a target is a set/list of labels or a 0/1 vector. Default loss ``"bce"``.

    mh.MultiLabel(["glasses", "beard", "hat"])
    """

    kind = "multilabel"
    default_loss = "bce"

    @property
    def out_features(self) -> int:
        return len(self.labels)

    def _placeholder(self) -> Any:
        return np.zeros(len(self.labels), dtype=np.float32)

    def _target_shape(self) -> tuple[int, ...]:
        return (len(self.labels),)

    def _encode_one(self, value: Any, name: str, column: str, row: int) -> np.ndarray:
        k = len(self.labels)
        if isinstance(value, str):
            value = [value]
        vector = np.zeros(k, dtype=np.float32)
        items = list(value.tolist() if isinstance(value, np.ndarray | torch.Tensor) else value)
        is_vector = all(isinstance(v, bool | int | float | np.number) and v in (0, 1) for v in items)
        if is_vector and len(items) == k:  # a 0/1 indicator vector rather than a set of label names
            return np.asarray(items, dtype=np.float32)
        for item in items:
            if self._key(item) not in self._index:
                message = f"{item!r} is not one of the head's labels {self.labels!r}"
                raise _row_error(name, column, row, message, _UNKNOWN)
            vector[self._index[self._key(item)]] = 1
        return vector

    def class_weight_vector(self, target: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor | None:
        if self.class_weights == "balanced":  # per-label positive weight: negatives / positives
            positives = target[labelled].sum(dim=0)
            return (labelled.sum() - positives) / positives.clamp(min=1)
        return super().class_weight_vector(target, labelled)

    def proba(self, output: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.canonical(output).float())

    def decode(self, output: torch.Tensor) -> list:
        return [[label for label, on in zip(self.labels, row) if on] for row in (self.canonical(output) > 0).tolist()]


KINDS: dict[str, type[Head]] = {cls.kind: cls for cls in (Regression, Binary, Categorical, Ordinal, MultiLabel)}
REGISTRY = KINDS  # head kind name -> class; becomes the heads/ package registry


def head_from_spec(spec: Mapping) -> Head:
    """Rebuild a head kind from :meth:`Head.spec` output (or a config entry)."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in KINDS:
        raise ValueError(f"unknown head kind {kind!r}; available: {sorted(KINDS)}")
    if kind == "regression":
        return Regression(standardize=spec.get("standardize", True), min=spec.get("min"), max=spec.get("max"))
    labels = spec.get("labels")
    if labels is None and kind != "binary":
        raise ValueError(f"a {kind} head needs labels")
    return KINDS[kind](
        labels, class_weights=spec.get("class_weights"), label_smoothing=spec.get("label_smoothing", 0.0)
    )


class HeadLayer(nn.Module):
    """The layer a :class:`MultiHeadNet` puts on the shared features for one head.

    With ``hidden`` units, a hidden layer and ReLU of the head's own (a "tower") come first:
    capacity for this head alone on top of the shared features. For standardized regression it
    holds the training targets' centre and scale as buffers, so the output is in the target's own
    units while the linear layer works near unit scale.
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
        self.squeeze = head.out_features == 1 and not isinstance(head, Ordinal)
        self.affine = isinstance(head, Regression) and head.standardize
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

"""The head-kind interface, the shared classifier base, the error for a bad target, and the registry of kinds.

A head kind says what one output of a multi-head net predicts and answers for itself everything
that depends on that: its output size and layer shape, how a column of targets is encoded (with
missing labels), its default loss and the losses that suit it, what a loss receives, its trivial
predictor, its metrics and primary metric, its predicted class or decoded value, and its
deployable read-out (probabilities or values) and how to decode that. No module outside
``heads/`` asks which kind a head is.

Register a kind of your own with :func:`register`; it then works in ``fit``, the YAML config
(``kind: NAME``), model files, reports, export and the service:

    @register("count")
    class Count(Regression): ...
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from manyheads.calibration import fit_temperature
from manyheads.registry import add_to
from manyheads.rows import BadRow, RowError

Encoded = tuple[torch.Tensor, torch.Tensor]  # (target, labelled mask)
NOT_A_NUMBER, NOT_A_LABEL = "label not a number", "label not in the head's labels"  # short reasons to count by

REGISTRY: dict[str, type[Head]] = {}


def register(kind: str) -> Callable[[type[Head]], type[Head]]:
    """Class decorator: make a head kind known by name (specs, configs, model files).

    @register("regression") class Regression(Head): ...
    """

    return add_to(REGISTRY, kind, what="head kind", attribute="kind")


def head_from_spec(spec: Mapping, name: str | None = None) -> Head:
    """Rebuild a head from :meth:`Head.spec` output (or a config entry); errors name the head and field.

    head_from_spec({"kind": "categorical", "labels": ["a", "b"]})
    """
    where = f"head {name!r}" if name is not None else "a head spec"
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}: a head spec is a mapping with a 'kind', got {type(spec).__name__}")
    kind = spec.get("kind")
    if not isinstance(kind, str) or kind not in REGISTRY:
        raise ValueError(f"{where}: unknown head kind {kind!r}; available: {sorted(REGISTRY)}")
    cls = REGISTRY[kind]
    fields = {key: value for key, value in spec.items() if key not in ("kind", "calibration")}
    unknown = sorted(set(fields) - set(cls.spec_fields))
    if unknown:
        raise ValueError(f"{where}: {unknown} do not apply to a {kind} head; its fields are {list(cls.spec_fields)}")
    try:
        head = cls.from_spec(fields)
        if spec.get("calibration") is not None:
            head.load_calibration(spec["calibration"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None
    return head


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


def row_error(head: str, column: str, row: Any, message: str, reason: str = "bad label") -> RowError:
    """The error for one bad target: ``head 'age', column 'age', row 7: ...``; ``reason`` is the short form."""
    return RowError(f"head {head!r}, column {column!r}, row {row}: {message}", reason)


def _threshold(value: Any, what: str, low: float, high: float) -> float | None:
    """None, or a number in ``(low, high)``: a head's abstention threshold."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low < value < high:
        raise ValueError(f"{what} must be a number between {low:g} and {high:g}, got {value!r}")
    return float(value)


def _as_list(values: Any) -> list:
    if isinstance(values, torch.Tensor | np.ndarray):
        return values.tolist() if isinstance(values, torch.Tensor) else list(values)
    return list(values)


class Head:
    """Base of all head kinds: the interface every kind answers, with defaults for one-logit outputs."""

    kind: ClassVar[str] = ""  # the registry name, set by @register
    default_loss: ClassVar[str] = ""
    losses: ClassVar[frozenset[str]] = frozenset()  # registered losses that suit this kind
    smoothable: ClassVar[frozenset[str]] = frozenset()  # of those, the ones that take label_smoothing's soft targets
    loss_variants: ClassVar[dict[str, str]] = {}  # a loss name -> the registered form this kind needs
    primary: ClassVar[str] = ""  # the metric the head is judged and selected by
    higher_is_better: ClassVar[bool] = True
    continuous: ClassVar[bool] = False  # answers are numbers on a line: reports show the error by true value
    groups: ClassVar[bool] = False  # each label is a group of rows: confusion matrix and fairness table
    readout_kind: ClassVar[str] = "probabilities"  # what the deployed graph answers: "value" or "probabilities"
    calibration_keeps_answers: ClassVar[bool] = True  # calibrating changes probabilities or intervals, not answers
    spec_fields: ClassVar[tuple[str, ...]] = ()
    labels: list | None = None
    class_weights: str | Mapping | None = None
    label_smoothing: float = 0.0
    abstain: float | None = None  # see calibrate(): answers past this threshold are marked uncertain

    # ---- outputs -------------------------------------------------------------------------

    @property
    def out_features(self) -> int:
        """Units of the head's output layer."""
        return 1

    @property
    def squeeze(self) -> bool:
        """Whether the output layer answers [B] rather than [B, out_features]."""
        return self.out_features == 1

    @property
    def standardized(self) -> bool:
        """Whether the output layer works in units of the training targets' spread (see ``target_scale``)."""
        return False

    def canonical(self, output: torch.Tensor) -> torch.Tensor:
        """Bring a raw output to this kind's shape: [B] for one-logit heads, [B, k] otherwise."""
        if self.squeeze:
            return output.reshape(output.shape[0])
        return output.reshape(output.shape[0], self.out_features)

    def target_scale(self, values: torch.Tensor) -> tuple[float, float] | None:
        """(centre, scale) of labelled training targets for a standardized output layer; None otherwise."""
        return None

    # ---- targets -------------------------------------------------------------------------

    def encode(
        self,
        values: Any,
        *,
        name: str = "?",
        column: str | None = None,
        bad: dict | None = None,
        row_numbers: Sequence | None = None,
    ) -> Encoded:
        """Encode a column into ``(target, labelled)``; missing labels get a placeholder.

        A value that cannot be encoded raises a :class:`~manyheads.rows.RowError` naming head,
        column and row, or, when a ``bad`` dict is given, is recorded there (position ->
        :class:`~manyheads.rows.BadRow`) and left unlabelled. Messages name
        ``row_numbers[position]`` when given (the row in the user's table when ``values`` is a
        part of it), else the position.
        """
        values = _as_list(values)
        column = column or name
        targets, labelled = [], []
        for position, value in enumerate(values):
            row = position if row_numbers is None else row_numbers[position]
            try:
                if is_missing(value):
                    raise LookupError
                targets.append(self._encode_one(value, name, column, row))
                labelled.append(True)
            except LookupError:
                targets.append(self._placeholder())
                labelled.append(False)
            except ValueError as error:
                if bad is None:
                    raise
                record = error.bad_row(row) if isinstance(error, RowError) else BadRow(row, "bad label", str(error))
                bad.setdefault(position, record)
                targets.append(self._placeholder())
                labelled.append(False)
        target = torch.tensor(np.array(targets), dtype=self._target_dtype)
        if not values:
            target = target.reshape(0, *self._target_shape())
        return target, torch.tensor(labelled, dtype=torch.bool)

    _target_dtype = torch.float32

    def _placeholder(self) -> Any:
        return 0

    def _target_shape(self) -> tuple[int, ...]:
        return ()

    def _encode_one(self, value: Any, name: str, column: str, row: Any) -> Any:
        raise NotImplementedError

    # ---- losses --------------------------------------------------------------------------

    def loss_inputs(
        self, output: torch.Tensor, target: torch.Tensor, loss: str, scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What a built-in loss ``loss`` receives: the canonical output and the (smoothed) target."""
        output = self.canonical(output).float()
        return output, self.smooth(target, output.shape[-1])

    def smooth(self, target: torch.Tensor, classes: int) -> torch.Tensor:
        """Targets moved ``label_smoothing`` towards uniform (unchanged without smoothing)."""
        return target

    def loss_options(self, loss: str) -> dict[str, Any]:
        """Keyword arguments this kind gives the registered loss ``loss`` (e.g. a label spread in bins)."""
        return {}

    def row_weights(self, target: torch.Tensor, class_weight: torch.Tensor | None) -> torch.Tensor | None:
        """Per-row loss weights from per-class weights (by true class); None when rows weigh alike."""
        return None

    def class_weight_vector(self, target: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor | None:
        """Per-class weights from ``class_weights`` and the training targets; None without class weights."""
        return None

    def trivial_output(self, target: torch.Tensor) -> torch.Tensor:
        """The raw output of the best constant predictor for these labelled targets (``normalize=True``)."""
        raise NotImplementedError

    # ---- answers -------------------------------------------------------------------------

    def predicted(self, output: torch.Tensor) -> torch.Tensor:
        """The answer as a tensor: class index per row (0/1 per label for multi-label), or the value."""
        raise NotImplementedError

    def proba(self, output: torch.Tensor) -> torch.Tensor | None:
        """Per-class probabilities, or None for heads that are not classifiers."""
        return None

    def readout(self, output: torch.Tensor) -> torch.Tensor:
        """What a deployed head answers (the ONNX graph, the service): probabilities or values.

        Uses only operations every ONNX opset has.
        """
        probabilities = self.proba(output)
        return self.canonical(output).float() if probabilities is None else probabilities

    def decode(self, output: torch.Tensor) -> list:
        """User-facing answers from raw outputs: floats, or label names."""
        return self.decode_readout(self.readout(output).detach().cpu().numpy())

    def decode_readout(self, readout: np.ndarray) -> list:
        """User-facing answers from a read-out (an ONNX graph's output, or :meth:`readout`)."""
        raise NotImplementedError

    def extras(self, readout: np.ndarray) -> dict[str, list]:
        """What a calibrated head answers beside the value, per row: ``"interval"``, ``"uncertain"``.

        ``net.predict`` gives each as a ``NAME_KEY`` entry (``"age_interval"``); {} without calibration.
        """
        return {}

    def answers(self, readout: np.ndarray) -> list[dict[str, Any]]:
        """One JSON-ready answer per row: ``{"value": ...}``, for classifiers ``"probabilities"``, and the extras."""
        values = self.decode_readout(readout)
        if self.labels is None:
            rows: list[dict[str, Any]] = [{"value": value} for value in values]
        else:
            names = [str(label) for label in self.labels]
            rows = [
                {"value": value, "probabilities": {n: float(p) for n, p in zip(names, row)}}
                for value, row in zip(values, np.asarray(readout).tolist())
            ]
        for key, column in self.extras(readout).items():
            for row, item in zip(rows, column):
                row[key] = item
        return rows

    # ---- calibration ---------------------------------------------------------------------

    def calibrate(self, output: torch.Tensor, target: torch.Tensor, **options: Any) -> dict[str, float] | None:
        """Fit this kind's calibration on held-out labelled rows' raw outputs; a summary, or None if it has none.

        ``options``: ``coverage`` and ``interval`` for numbers, ``abstain`` (a threshold) for all.
        """
        return None

    def calibration_spec(self) -> dict | None:
        """The fitted calibration, JSON-safe (stored in the model file under the head's ``calibration``)."""
        return None

    def load_calibration(self, data: Mapping) -> None:
        """Restore :meth:`calibration_spec` output; a damaged record is a ValueError."""
        raise ValueError(f"a {self.kind} head has no calibration to load")

    def set_coverage(self, coverage: float) -> None:
        """Answer intervals at another coverage (heads with intervals only; others ignore it)."""

    def file_spec(self) -> dict:
        """:meth:`spec` plus the fitted calibration: what model files and exports store."""
        calibration = self.calibration_spec()
        return self.spec() if calibration is None else {**self.spec(), "calibration": calibration}

    def uncalibrated(self) -> Head:
        """A copy of this head as it answered before calibration (the report's "before")."""
        return head_from_spec(self.spec())

    # ---- metrics -------------------------------------------------------------------------

    def metrics(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """Metrics on labelled rows only (rows already selected); {} for no rows."""
        raise NotImplementedError

    def per_row(self, output: torch.Tensor, target: torch.Tensor, metric: str) -> torch.Tensor | None:
        """Each row's share of ``metric`` when it is a mean over rows (for the bootstrap); else None."""
        return None

    # ---- files ---------------------------------------------------------------------------

    def spec(self) -> dict:
        """A JSON-safe description, enough to rebuild the head with :func:`head_from_spec`."""
        return {"kind": self.kind}

    @classmethod
    def from_spec(cls, fields: Mapping) -> Head:
        """Build the kind from a spec's fields (all but ``kind``); see :func:`head_from_spec`."""
        return cls(**fields)

    @classmethod
    def example(cls) -> Head:
        """A small instance of this kind, for documentation and the checks every registered kind passes."""
        return cls()

    def schema(self) -> dict:
        """What a client needs to read the answers: kind and labels."""
        return {"kind": self.kind, "labels": None if self.labels is None else list(self.labels)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Classifier(Head):
    """Shared code of heads whose targets are label names or class indices."""

    groups: ClassVar[bool] = True
    spec_fields: ClassVar[tuple[str, ...]] = ("labels", "class_weights", "label_smoothing")
    smoothable: ClassVar[frozenset[str]] = frozenset({"bce", "cross_entropy", "focal"})

    def __init__(
        self, labels: Sequence, class_weights: str | Mapping | None = None, *, label_smoothing: float = 0.0
    ) -> None:
        if isinstance(labels, str) or not isinstance(labels, Sequence | np.ndarray):
            raise ValueError(f"{type(self).__name__} labels must be a list of labels, got {labels!r}")
        labels = list(labels)
        if len(labels) < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 labels, got {labels!r}")
        if not all(isinstance(label, str | int | float) and not isinstance(label, bool) for label in labels):
            raise ValueError(f"{type(self).__name__} labels must be strings or numbers, got {labels!r}")
        if len(set(map(str, labels))) != len(labels):
            raise ValueError(f"{type(self).__name__} labels must be distinct, got {labels!r}")
        if isinstance(class_weights, str) and class_weights != "balanced":
            raise ValueError(f"class_weights must be 'balanced' or a mapping label -> weight, got {class_weights!r}")
        if not isinstance(class_weights, str | Mapping | None):
            raise ValueError(f"class_weights must be 'balanced' or a mapping label -> weight, got {class_weights!r}")
        if not isinstance(label_smoothing, int | float) or not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.labels = labels
        self.class_weights = class_weights
        self.label_smoothing = float(label_smoothing)
        self._index = {self._key(label): i for i, label in enumerate(labels)}
        self.temperature: float | None = None  # fitted by calibrate(); None: the logits as trained

    def logits(self, output: torch.Tensor) -> torch.Tensor:
        """The canonical output divided by the fitted temperature (as trained before calibration)."""
        logits = self.canonical(output).float()
        return logits if self.temperature is None else logits / self.temperature

    @classmethod
    def from_spec(cls, fields: Mapping) -> Head:
        if "labels" not in fields:
            raise ValueError(f"a {cls.kind} head needs labels")
        return cls(**fields)

    @classmethod
    def example(cls) -> Head:
        return cls(["a", "b", "c"])

    @staticmethod
    def _key(value: Any) -> Any:
        return value.item() if isinstance(value, np.generic) else value

    def _class_index(self, value: Any, name: str, column: str, row: Any) -> int:
        value = self._key(value)
        if isinstance(value, bool):
            value = int(value)
        try:
            if value in self._index:
                return self._index[value]
        except TypeError:  # unhashable, e.g. a list in a single-label column
            message = f"expected one label of {self.labels!r}, got a {type(value).__name__}: {value!r}"
            raise row_error(name, column, row, message, "label of the wrong type") from None
        named = self._index.get(str(int(value)) if isinstance(value, float) and value.is_integer() else str(value))
        if isinstance(value, int | float) and named is not None:  # 3 read from a CSV cell "3" names the label "3"
            return named
        by_index = not any(isinstance(label, int | float) for label in self.labels) or self.labels == [0, 1]
        if by_index and isinstance(value, int | float) and float(value).is_integer() and 0 <= value < len(self.labels):
            return int(value)
        message = f"{value!r} is not one of the head's labels {self.labels!r} (or an index below {len(self.labels)})"
        raise row_error(name, column, row, message, NOT_A_LABEL)

    def smooth(self, target: torch.Tensor, classes: int) -> torch.Tensor:
        """Class indices become probability rows, ``1 - e`` on the true class and ``e`` spread over all."""
        e = self.label_smoothing
        if not e:
            return target
        return F.one_hot(target.long(), classes).float() * (1 - e) + e / classes

    def row_weights(self, target: torch.Tensor, class_weight: torch.Tensor | None) -> torch.Tensor | None:
        if class_weight is None:
            return None
        return class_weight.to(target.device)[target.long()]

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

    # ---- calibration: temperature scaling -------------------------------------------------

    def nll(self, output: torch.Tensor, target: torch.Tensor) -> float:
        """Mean negative log-likelihood of the true classes under :meth:`proba`."""
        p = self.proba(output)
        return float(-torch.gather(p, 1, target.long().reshape(-1, 1)).clamp_min(1e-12).log().mean())

    def calibrate(self, output: torch.Tensor, target: torch.Tensor, **options: Any) -> dict[str, float]:
        """Fit the temperature that minimises the NLL of the rows' true classes (Guo et al. 2017)."""
        output, target = output.detach().float().cpu(), target.cpu()

        def nll(temperature: float) -> float:
            self.temperature = temperature
            return self.nll(output, target)

        before = nll(1.0)
        self.temperature = fit_temperature(nll)
        self.abstain = _threshold(options.get("abstain"), "abstain", 0.0, 1.0)
        return {"temperature": self.temperature, "nll_before": before, "nll_after": self.nll(output, target)}

    def calibration_spec(self) -> dict | None:
        if self.temperature is None:
            return None
        return {"temperature": self.temperature, **({"abstain": self.abstain} if self.abstain is not None else {})}

    def load_calibration(self, data: Mapping) -> None:
        temperature = data.get("temperature") if isinstance(data, Mapping) else None
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 < temperature < math.inf:
            raise ValueError(f"calibration needs a positive finite 'temperature', got {data!r}")
        self.temperature = float(temperature)
        self.abstain = _threshold(data.get("abstain"), "calibration 'abstain'", 0.0, 1.0)

    def confident(self, readout: np.ndarray) -> np.ndarray:
        """Each row's confidence in its answer: the top class probability."""
        return np.asarray(readout).max(axis=1)

    def extras(self, readout: np.ndarray) -> dict[str, list]:
        if self.abstain is None:
            return {}
        return {"uncertain": (self.confident(readout) < self.abstain).tolist()}

    def per_row(self, output: torch.Tensor, target: torch.Tensor, metric: str) -> torch.Tensor | None:
        if metric == "accuracy":
            return (self.predicted(output) == target.long()).float().reshape(target.shape[0], -1).mean(dim=1)
        return None

    def spec(self) -> dict:
        spec = {**super().spec(), "labels": list(self.labels)}
        if self.class_weights is not None:
            cw = self.class_weights
            spec["class_weights"] = cw if isinstance(cw, str) else dict(cw)
        if self.label_smoothing:
            spec["label_smoothing"] = self.label_smoothing
        return spec

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self.labels)!r})"

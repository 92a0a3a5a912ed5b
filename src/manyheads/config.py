"""Run configuration: a YAML file that mirrors the Python API, validated by pydantic.

Sections: ``data`` (where the table comes from), ``heads`` (name -> kind, labels, loss, weight),
``model`` (the net), ``train`` (the options of :func:`manyheads.fit`) and ``split`` (held-out
test and validation fractions). Relative data paths are read from the current directory.

    cfg = load_config("examples/utkface.yaml", ["train.epochs=2"])
    result = mh.fit(cfg.build_net(), df, **cfg.fit_kwargs())
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from manyheads import columns, validation
from manyheads.heads import Head, head_from_spec


def _sources() -> dict:
    """The data sources by name (manyheads.sources.REGISTRY), read when a config is checked."""
    from manyheads.sources import REGISTRY

    return REGISTRY


_SOURCE = validation.OneOf(_sources)


CALIBRATION_ROWS = ("calibration", "validation")


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check(constraint: validation.Constraint, value: Any) -> Any:
    """``value`` when ``constraint`` accepts it; else a ValueError in validation's ``must be ...; got ...`` form."""
    found = validation.problem(constraint, value)
    if found is not None:
        raise ValueError(found)
    return value


class DataConfig(_Section):
    """Where the table comes from: a source in ``manyheads.sources``; ``shapes`` generates ``limit`` images (512)."""

    source: str = "shapes"  # a name in manyheads.sources.REGISTRY
    path: str | None = None  # utkface: image folder; fairface, csv: label CSV; hf: save_to_disk folder; parquet: file
    images: str | None = None  # fairface, csv, parquet: the folder image paths are relative to (default: the file's)
    image_column: str = "image"  # csv, parquet: the column that names image files (or holds their bytes)
    split: str | None = None  # hf: the split of a DatasetDict (needed when it has more than one)
    inputs: str = "image"  # the input column of the loaded table
    limit: int | None = Field(None, ge=1)  # keep this many rows, evenly spaced
    # stream sources (webdataset): the held-out rows, as shards (a .tar URL pattern) or a CSV / Parquet table
    validation: str | None = None
    test: str | None = None

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        return _check(_SOURCE, source)

    @model_validator(mode="after")
    def _needs_path(self) -> DataConfig:
        source = _sources()[self.source]
        if source.needs_path and not self.path:
            raise ValueError(f"the {self.source} source needs data.path (or --data PATH on the command line)")
        held_out = [key for key in ("validation", "test") if getattr(self, key)]
        if held_out and not source.stream:
            raise ValueError(f"data.{held_out[0]} names the held-out rows of a stream source; a {self.source} table "
                             f"is split by split.{held_out[0]} instead")  # fmt: skip
        if source.stream and self.limit is not None:
            raise ValueError(f"data.limit does not apply to the {self.source} source (a stream has no length); "
                             "train.steps_per_epoch sets how much of it an epoch reads")  # fmt: skip
        return self

    def is_stream(self) -> bool:
        """Whether the source streams (shards read as training goes) instead of loading a table."""
        return _sources()[self.source].stream


_EVERY_HEAD = {"kind", "loss", "weight", "hidden"}  # HeadConfig fields that every head kind takes


class HeadConfig(_Section):
    """One head: kind and labels; optionally loss, constant weight, class weights, label smoothing, hidden layer.

    A kind's own fields beyond these (a distribution head's ``step``, ``sigma``, ``answer``: its
    class's ``spec_fields``) are written next to them in the YAML and kept in ``options``.
    """

    kind: str  # a name in manyheads.heads.REGISTRY
    labels: list[str | int | float] | None = None
    loss: str | None = None
    weight: float = 1.0
    class_weights: Literal["balanced"] | dict[str | int, float] | None = None
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # classifiers: train towards 1 - e, spread e evenly
    standardize: bool = True  # regression: learn in units of the targets' spread
    hidden: int = Field(0, ge=0)  # units of a hidden layer of this head's own before its output; 0: none
    min: float | None = None  # regression: targets outside [min, max] are bad rows
    max: float | None = None
    options: dict[str, Any] = {}  # the kind's own fields (flat in the YAML)

    @model_validator(mode="before")
    @classmethod
    def _kind_fields(cls, data: Any) -> Any:
        """Move the fields of the named kind that are not fields here into ``options``."""
        if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
            return data
        from manyheads.heads import REGISTRY

        own = set(getattr(REGISTRY.get(data["kind"]), "spec_fields", ())) - set(cls.model_fields)
        moved = {key: value for key, value in data.items() if key in own}
        if not moved:
            return data
        kept = {key: value for key, value in data.items() if key not in moved}
        return {**kept, "options": {**kept.get("options", {}), **moved}}

    @model_serializer(mode="wrap")
    def _flat(self, handler: Any) -> dict[str, Any]:
        """The entry as written in YAML: the kind's own options flat, and no field the kind does not take.

        (A distribution head's written config showed ``standardize: true``, which means nothing for it.)
        """
        from manyheads.heads import REGISTRY

        dumped = handler(self)
        taken = _EVERY_HEAD | set(getattr(REGISTRY.get(self.kind), "spec_fields", ()))
        # a field the kind does not take is dropped only at its default: set, it must reach build() to be refused
        unused = {k for k, v in dumped.items() if k not in taken and v == type(self).model_fields[k].default}
        kept = {k: v for k, v in dumped.items() if k != "options" and k not in unused}
        return {**kept, **dumped.get("options", {})}

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        return _check(validation.HEAD_KIND, kind)

    @field_validator("weight")
    @classmethod
    def _weight(cls, weight: float) -> float:
        return _check(validation.WEIGHT, weight)

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, loss: str | None, info: ValidationInfo) -> str | None:
        if loss is not None:
            validation.check_loss(loss, info.data.get("kind"))  # the kind, when it was valid itself
        return loss

    @model_validator(mode="after")
    def _buildable(self) -> HeadConfig:
        head = self.build()  # head kinds check their own fields, labels and class weights
        if self.label_smoothing:
            loss = self.loss or head.default_loss
            smoothable = validation.smoothable_losses(head)
            if validation.canonical_loss(loss) not in smoothable:
                raise ValueError(f"label_smoothing applies to the losses {sorted(smoothable)}, not {loss!r}")
        return self

    def build(self) -> Head:
        """The head kind this entry describes: ``HeadConfig(kind="binary").build()``.

        Only the fields set to other than their defaults go to the head kind, which refuses those
        that do not apply to it (``min`` on a binary head).
        """
        return head_from_spec(
            self.model_dump(exclude={"loss", "weight", "hidden"}, exclude_none=True, exclude_defaults=True)
            | {"kind": self.kind}  # the kind's own options are flat in the dump
        )


class ModelConfig(_Section):
    """The net: a backbone by name (torchvision, or ``timm:NAME``), input size, dropout, test-time flips."""

    backbone: str = "mobilenet_v2"
    pretrained: bool | str = False  # True: the default ImageNet weights; a string names torchvision weights
    image_size: int = Field(128, ge=16)
    dropout: float = Field(0.0, ge=0, lt=1)
    tta: str | None = None  # one of net.TTA_MODES; "flip": answers average the image and its mirror

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        return validation.check_backbone(name)

    @field_validator("tta")
    @classmethod
    def _known_tta(cls, tta: str | None) -> str | None:
        return _check(validation.TTA, tta)


class AugmentConfig(_Section):
    """Settings of :class:`manyheads.images.Augment`."""

    crop_scale: tuple[float, float] | None = (0.8, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    translate: float = Field(0.05, ge=0)
    flip: bool = True
    jitter: float = Field(0.1, ge=0, lt=1)
    padding: Literal["reflection", "border", "zeros"] = "reflection"  # outside the image, when zoomed out
    rotate: float = Field(0.0, ge=0, le=180)  # degrees
    grey: float = Field(0.0, ge=0, le=1)  # the share of samples made greyscale
    blur: float = Field(0.0, ge=0, le=1)
    erase: float = Field(0.0, ge=0, le=1)
    erase_fill: Literal["noise", "mean"] = "noise"


# What a YAML file can say of fit's options that also take Python objects: names only.
_IN_A_FILE = {
    "optimizer": validation.OPTIMIZER_NAME,
    "weights": validation.Optional(validation.STRATEGY),  # constant weights go per head
}


class TrainConfig(_Section):
    """Options of :func:`manyheads.fit`; ``weights`` names a balancing strategy (constants go per head).

    Every field that is a fit option is checked by fit's own constraint (``validation.FIT_CONSTRAINTS``).
    """

    epochs: int = 10
    steps_per_epoch: int | None = None  # stream sources: batches per process that make an epoch
    batch_size: int = 64
    lr: float = 1e-3
    trunk_lr: float | None = None
    weight_decay: float | None = None
    optimizer: str = "adamw"  # a name in optim.OPTIMIZERS
    schedule: str | None = None  # one of optim.SCHEDULES
    warmup: float = 0.3
    freeze_trunk_epochs: int = 0
    ema: float | None = None  # decay of a moving average of the weights
    precision: str = "fp32"  # a name in precision.PRECISIONS
    channels_last: bool | None = None  # None: on for named backbones with image inputs
    compile: bool = False
    augment: bool | AugmentConfig = True
    normalize: bool = False
    weights: str | None = None  # a balancing strategy name
    monitor: str | dict[str, float] | None = None  # a column, or column -> weight (a weighted mix)
    patience: int | None = None
    keep_best_per_head: bool = False
    seed: int | None = 0  # fixed by default: a config reruns the same
    on_bad: str = "error"
    checkpoint_every: int | None = None
    device: str | None = None
    cache_dir: str | None = None
    workers: int | None = None
    log: list[str] = []  # experiment trackers by name (manyheads.loggers.REGISTRY): fit's loggers=

    @field_validator(*validation.FIT_CONSTRAINTS, check_fields=False)
    @classmethod
    def _fit_option(cls, value: Any, info: ValidationInfo) -> Any:
        constraint = _IN_A_FILE.get(info.field_name) or validation.FIT_CONSTRAINTS[info.field_name]
        return _check(constraint, value)

    @field_validator("log")
    @classmethod
    def _known_loggers(cls, names: list[str]) -> list[str]:
        return [_check(validation.LOGGER_NAME, name) for name in names]  # installed: fit checks, before any work


class SplitConfig(_Section):
    """Held-out fractions of all rows: a test split never trained on, a validation and a calibration split."""

    test: float = Field(0.15, ge=0, lt=1)
    validation: float = Field(0.1, ge=0, lt=1)
    calibration: float = Field(0.0, ge=0, lt=1)  # rows kept apart to calibrate on after training
    seed: int = 0

    @model_validator(mode="after")
    def _leaves_training_rows(self) -> SplitConfig:
        if self.test + self.validation + self.calibration >= 1:
            raise ValueError(f"test + validation + calibration must leave rows to train on, got {self.test} + "
                             f"{self.validation} + {self.calibration}")  # fmt: skip
        return self


class CalibrateConfig(_Section):
    """Calibration after training (see :func:`manyheads.calibrate`): on which rows, and the intervals.

    ``rows``: ``"calibration"`` (the split's own calibration rows; the default when ``split.calibration``
    is set) or ``"validation"`` (the validation rows; the default otherwise).
    """

    rows: str | None = None
    coverage: float = 0.9
    interval: str = "adaptive"
    abstain: dict[str, float] | None = None  # head -> threshold: answers past it are marked uncertain

    @field_validator("rows")
    @classmethod
    def _known_rows(cls, rows: str | None) -> str | None:
        return _check(validation.OneOf(CALIBRATION_ROWS), rows) if rows is not None else None

    @field_validator("coverage", "interval", "abstain")
    @classmethod
    def _fit_option(cls, value: Any, info: ValidationInfo) -> Any:
        return _check(validation.FIT_CONSTRAINTS[info.field_name], value)


class RunConfig(_Section):
    """A whole run: data, heads, model, training options and split."""

    data: DataConfig = DataConfig()
    heads: dict[str, HeadConfig] = Field(min_length=1)
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    split: SplitConfig = SplitConfig()
    calibrate: CalibrateConfig | None = None  # None: calibrate only when split.calibration keeps rows for it

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        strategy = self.train.weights
        if strategy and strategy.lower() != "constant":
            weighted = [name for name, head in self.heads.items() if head.weight != 1]
            if weighted:
                raise ValueError(
                    f"heads {weighted} set a weight, but train.weights={strategy!r} sets the weights; drop one"
                )
        monitored = [self.train.monitor] if isinstance(self.train.monitor, str) else list(self.train.monitor or [])
        for column in monitored:
            named = columns.head_of(column)
            if named not in self.heads and named != columns.TOTAL:
                raise ValueError(f"train.monitor {column!r} names no head; heads: {sorted(self.heads)}")
        if self.data.inputs in self.heads:
            raise ValueError(f"data.inputs {self.data.inputs!r} is also a head name")
        rows = self.calibration_rows()
        if rows is not None and not self.data.is_stream() and not getattr(self.split, rows):
            raise ValueError(f"calibrate.rows is {rows!r}, but split.{rows} is 0: set split.{rows} (e.g. 0.1)")
        unknown = sorted(set(self.calibrate.abstain or {}) - set(self.heads)) if self.calibrate else []
        if unknown:
            raise ValueError(f"calibrate.abstain names heads {unknown} that the config does not have")
        return self

    @model_validator(mode="after")
    def _stream_fits(self) -> RunConfig:
        """A stream source has no length and is not split: an epoch is train.steps_per_epoch steps, and the
        held-out rows are data.validation and data.test (the split fractions do not apply)."""
        source = self.data.source
        if not self.data.is_stream():
            if self.train.steps_per_epoch is not None:
                raise ValueError(f"train.steps_per_epoch applies to stream sources (webdataset); a {source} "
                                 "table's epoch is one pass over its rows")  # fmt: skip
            return self
        if self.train.steps_per_epoch is None:
            raise ValueError(f"train.steps_per_epoch: the {source} source is a stream, which has no length: set how "
                             "many steps make an epoch (e.g. samples // batch_size)")  # fmt: skip
        given = [key for key in sorted(self.split.model_fields_set & {"test", "validation", "calibration"})
                 if getattr(self.split, key)]  # fmt: skip
        if given:
            use = "data.validation or data.test" if given[0] != "calibration" else "calibrate.rows: validation"
            raise ValueError(f"split.{given[0]} is a fraction of a table; the {source} source is a stream and cannot "
                             f"be split: give its held-out rows as {use} (shards or a CSV) instead")  # fmt: skip
        rows = self.calibration_rows()
        if rows is not None and (rows == "calibration" or not self.data.validation):
            raise ValueError(f"calibrate.rows is {rows!r}: a stream source calibrates on data.validation, so set it "
                             "(and calibrate.rows: validation)")  # fmt: skip
        return self

    def calibration_rows(self) -> str | None:
        """Which split's rows the net is calibrated on after training: "calibration", "validation" or None."""
        if self.calibrate is None:
            return "calibration" if self.split.calibration else None
        if self.calibrate.rows is not None:
            return self.calibrate.rows
        return "calibration" if self.split.calibration else "validation"

    # ---- what the config means for the Python API -------------------------------------------

    def build_heads(self) -> dict[str, Head]:
        """Head name -> head kind, in config order."""
        return {name: head.build() for name, head in self.heads.items()}

    def net_kwargs(self) -> dict[str, Any]:
        """Arguments of :class:`manyheads.MultiHeadNet`: ``mh.MultiHeadNet(**cfg.net_kwargs())``."""
        m = self.model
        return {
            "trunk": m.backbone,
            "heads": self.build_heads(),
            "pretrained": m.pretrained,
            "image_size": m.image_size,
            "dropout": m.dropout,
            "hidden": {name: head.hidden for name, head in self.heads.items()},
            "tta": m.tta,
        }

    def build_net(self):
        """A fresh, untrained :class:`manyheads.MultiHeadNet` for this config."""
        from manyheads.net import MultiHeadNet

        return MultiHeadNet(**self.net_kwargs())

    def fit_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`manyheads.fit` (all but data, validation and run folder)."""
        t = self.train
        options = t.model_dump(exclude={"weights", "augment", "log"})
        options["loggers"] = list(t.log)
        if isinstance(t.augment, AugmentConfig):
            from manyheads.images import Augment

            options["augment"] = Augment(**t.augment.model_dump())
        else:
            options["augment"] = t.augment
        options["inputs"] = self.data.inputs
        options["losses"] = {name: head.loss for name, head in self.heads.items() if head.loss}
        options["weights"] = t.weights or {name: head.weight for name, head in self.heads.items()}
        if self.calibration_rows() is not None:  # "calibration" rows are a table the run passes as calibration=
            options |= (self.calibrate or CalibrateConfig()).model_dump(exclude={"rows"})
            options["calibration"] = "validation" if self.calibration_rows() == "validation" else None
        return options

    def resolved(self) -> RunConfig:
        """A copy whose data paths are absolute, so the run folder works from any directory (URLs stay as they are)."""
        keys = ("path", "images", "validation", "test")
        data = self.data.model_copy(
            update={key: os.path.abspath(value) for key in keys if (value := getattr(self.data, key)) and _local(value)}
        )
        if not self.data.is_stream():
            return self.model_copy(update={"data": data})
        split = self.split.model_copy(update={"test": 0.0, "validation": 0.0, "calibration": 0.0})  # none applies
        return self.model_copy(update={"data": data, "split": split})

    def to_yaml(self) -> str:
        """The config as YAML (every option, defaults included)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _local(path: str) -> bool:
    """A path here, not a URL webdataset opens (``pipe:``, ``http://``, ``s3://``, ...)."""
    return not path.startswith("pipe:") and "://" not in path


# ---- loading ----------------------------------------------------------------------------------


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """Set ``key.sub=value`` entries (values parsed as YAML) in a raw config dict, in place."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.epochs=3")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text  # a plain string such as "a: b" that YAML cannot read
        parts = key.strip().split(".")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: depth + 1])} is not a section")
        node[parts[-1]] = value
    return raw


def _allowed(loc: tuple) -> list[str]:
    """The keys allowed where an unknown key was found (for the error message)."""
    sections = {name: field.annotation for name, field in RunConfig.model_fields.items()}
    if len(loc) == 1:
        return list(RunConfig.model_fields)
    if loc[0] == "heads":
        return [name for name in HeadConfig.model_fields if name != "options"]
    if loc[:2] == ("train", "augment"):
        return list(AugmentConfig.model_fields)
    model = sections.get(loc[0])
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


_BRANCHES = {"bool", "str", "int", "float", "AugmentConfig"}  # pydantic names union branches in error locations


def _describe(error: ValidationError) -> str:
    """One line: ``field.path: message`` per problem; of a union's branches only the informative ones."""
    found: dict[tuple, list[str]] = {}
    for item in error.errors():
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and ("[" in p or p in _BRANCHES)))
        if item["type"] == "extra_forbidden":
            message = f"unknown key; allowed here: {', '.join(_allowed(loc))}"
        else:
            message = item["msg"].removeprefix("Value error, ")
        if item["type"] not in ("missing", "extra_forbidden", "value_error") and "input" in item:
            message += f" (got {item['input']!r})"
        found.setdefault(loc, []).append(message)
    # A union reports every branch: "not a boolean" at train.augment says nothing once train.augment.jiter is wrong.
    deepest = [loc for loc in found if not any(other[: len(loc)] == loc and other != loc for other in found)]
    return "; ".join(
        f"{'.'.join(map(str, loc)) or '(top level)'}: {' or '.join(dict.fromkeys(found[loc]))}" for loc in deepest
    )


def parse_config(raw: Any, source: str = "<config>") -> RunConfig:
    """Validate a raw dict into a :class:`RunConfig`; errors name ``source`` and the field."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config is a mapping of sections (data, heads, model, train, split)")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{source}: {_describe(error)}") from None


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a YAML run config, apply ``key.sub=value`` overrides, validate.

    cfg = load_config("examples/utkface.yaml", ["train.epochs=1", "heads.age.loss=huber"])
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where} ({getattr(error, 'problem', error)})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config is a mapping of sections (data, heads, model, train, split)")
    return parse_config(apply_overrides(raw or {}, overrides), str(path))

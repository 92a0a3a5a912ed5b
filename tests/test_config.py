"""Tests for manyheads.config: YAML run configs, overrides, validation messages, API arguments."""

import inspect
import os
import re
from pathlib import Path

import pytest
import yaml

import manyheads as mh
from manyheads.config import ConfigError, apply_overrides, load_config, parse_config

EXAMPLES = Path(__file__).parents[1] / "examples"
GOOD = {
    "data": {"source": "utkface", "path": "faces"},
    "heads": {
        "age": {"kind": "regression", "loss": "mae", "min": 0},
        "gender": {"kind": "binary", "labels": ["male", "female"], "weight": 2},
        "race": {"kind": "categorical", "labels": ["a", "b", "c"], "class_weights": "balanced", "hidden": 32},
    },
    "model": {"backbone": "mobilenet_v3_small", "image_size": 64, "tta": "flip"},
    "train": {"epochs": 2, "schedule": "onecycle", "augment": {"jitter": 0.2}},
}


def write(tmp_path: Path, raw) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def test_good_config_builds_the_net_and_fit_arguments(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    heads = cfg.build_heads()
    assert list(heads) == ["age", "gender", "race"]
    assert isinstance(heads["age"], mh.Regression) and heads["age"].min == 0
    assert heads["gender"].labels == ["male", "female"]
    assert heads["race"].class_weights == "balanced"
    net = cfg.build_net()
    assert net.backbone == "mobilenet_v3_small" and net.image_size == 64 and net.tta == "flip"
    assert net.head_layers["race"].tower[0].out_features == 32 and net.hidden == {"race": 32}
    options = cfg.fit_kwargs()
    assert options["losses"] == {"age": "mae"}
    assert options["weights"] == {"age": 1.0, "gender": 2.0, "race": 1.0}
    assert options["epochs"] == 2 and options["schedule"] == "onecycle" and options["inputs"] == "image"
    assert options["augment"].jitter == 0.2
    # every key is an argument of the API it is meant for
    inspect.signature(mh.fit).bind(net, None, **options)
    inspect.signature(mh.MultiHeadNet).bind(**cfg.net_kwargs())


def test_flagship_example_is_valid():
    cfg = load_config(EXAMPLES / "utkface.yaml")
    assert cfg.data.source == "utkface" and cfg.data.path == "../shared/data/utkface"
    assert {name: head.kind for name, head in cfg.heads.items()} == {
        "age": "distribution",
        "gender": "binary",
        "race": "categorical",
    }
    assert (cfg.heads["age"].loss, cfg.heads["age"].min, cfg.heads["age"].max) == ("dldl", 0, 120)
    assert cfg.heads["race"].labels == mh.datasets.UTKFACE_RACES
    assert (cfg.model.backbone, cfg.model.pretrained, cfg.model.image_size) == ("mobilenet_v2", True, 128)
    assert (cfg.split.test, cfg.split.validation, cfg.split.seed) == (0.15, 0.1, 0)
    assert cfg.calibration_rows() == "validation" and cfg.train.epochs == 12
    chips = load_config(EXAMPLES / "utkface_chips.yaml")  # the earlier recipe, kept as the baseline
    assert chips.heads["age"].kind == "regression" and chips.calibration_rows() is None


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"heads": {"age": {"kind": "regression", "lables": [1]}}}, "heads.age.lables", "unknown key"),
        ({"heads": {"age": {"kind": "regresion"}}}, "heads.age.kind", "'regression'"),
        ({"heads": {"age": {"kind": "regression", "loss": "maee"}}}, "heads.age.loss", "unknown loss 'maee'"),
        ({"heads": {"age": {"kind": "regression", "loss": "bce"}}}, "heads.age.loss", "does not fit"),
        ({"heads": {"race": {"kind": "categorical"}}}, "heads.race", "needs labels"),
        ({"heads": {"age": {"kind": "regression", "label_smoothing": 0.1}}}, "heads.age", "do not apply to a regr"),
        ({"heads": {"o": {"kind": "ordinal", "labels": [1, 2], "label_smoothing": 0.1}}}, "heads.o", "not 'corn'"),
        ({"heads": {"g": {"kind": "binary", "min": 0}}}, "heads.g", "['min'] do not apply to a binary head"),
        ({"heads": {"g": {"kind": "binary", "label_smoothing": 1}}}, "heads.g.label_smoothing", "less than 1"),
        ({"heads": {"g": {"kind": "binary", "weight": float("nan")}}}, "heads.g.weight", "finite number >= 0; got nan"),
        ({"train": {"epochs": 0}}, "train.epochs", "must be an integer >= 1; got 0"),
        ({"train": {"warmup": 5}}, "train.warmup", "must be a fraction in [0, 1); got 5.0"),
        ({"train": {"lr": float("inf")}}, "train.lr", "must be a finite number >= 0; got inf"),
        ({"train": {"patience": 0}}, "train.patience", "must be an integer >= 1 or None; got 0"),
        ({"train": {"optimizer": "adamx"}}, "train.optimizer", "one of ['adam', 'adamw', 'sgd']; got 'adamx'"),
        ({"train": {"schedule": "cosin"}}, "train.schedule", "'onecycle']; got 'cosin'"),
        ({"train": {"precision": "fp8"}}, "train.precision", "one of ['fp32', 'bf16', 'fp16']; got 'fp8'"),
        ({"train": {"on_bad": "drop"}}, "train.on_bad", "one of ['error', 'skip']; got 'drop'"),
        ({"train": {"weights": "magic"}}, "train.weights", "must be a balancing strategy"),
        ({"train": {"ema": 1}}, "train.ema", "must be a decay in [0, 1) or None; got 1.0"),
        ({"data": {"source": "tsv", "path": "x"}}, "data.source", "'shapes']; got 'tsv'"),
        ({"model": {"tta": "flop"}}, "model.tta", "one of [None, 'flip']; got 'flop'"),
        ({"heads": {"age": {"kind": "regression", "hidden": -8}}}, "heads.age.hidden", "greater than or equal to 0"),
        ({"train": {"augment": {"jiter": 0.1}}}, "train.augment.jiter", "unknown key"),
        ({"model": {"backbone": "resnet19"}}, "model.backbone", "unknown backbone"),
        ({"split": {"test": 0.6, "validation": 0.5}}, "split", "leave rows to train on"),
        ({"trian": {}}, "trian", "allowed here: data, heads, model, train, split"),
    ],
)
def test_errors_name_the_file_and_the_field(tmp_path, change, field, words):
    raw = {**GOOD, **change}
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ")
    assert f"{field}: " in message
    assert words in message
    assert "\n" not in message


def test_cross_field_checks(tmp_path):
    with pytest.raises(ConfigError, match=r"heads \['gender'\] set a weight, but train.weights='dwa'"):
        parse_config({**GOOD, "train": {"weights": "dwa"}})
    with pytest.raises(ConfigError, match="train.monitor 'height' names no head"):
        parse_config({**GOOD, "train": {"monitor": "height"}})
    with pytest.raises(ConfigError, match="utkface source needs data.path"):
        parse_config({**GOOD, "data": {"source": "utkface"}})
    assert parse_config({**GOOD, "train": {"monitor": "val/age/mae"}}).train.monitor == "val/age/mae"


def test_overrides_apply_before_validation(tmp_path):
    path = write(tmp_path, GOOD)
    cfg = load_config(
        path, ["train.epochs=5", "heads.age.loss=huber", "data.limit=40", "train.schedule=null", "split.test=0.2"]
    )
    assert cfg.train.epochs == 5 and cfg.heads["age"].loss == "huber" and cfg.data.limit == 40
    assert cfg.train.schedule is None and cfg.split.test == 0.2
    assert load_config(path).train.epochs == 2  # the file itself is untouched
    with pytest.raises(ConfigError, match=rf"{path}: heads.age.loss: unknown loss 'nope'"):
        load_config(path, ["heads.age.loss=nope"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(path, ["train.epochs"])
    with pytest.raises(ConfigError, match="train.epochs is not a section"):
        apply_overrides({"train": {"epochs": 1}}, ["train.epochs.x=1"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"not valid YAML at line 3"):
        load_config(write(tmp_path, "heads:\n  age: x\n   kind: regression\n"))
    with pytest.raises(ConfigError, match="a mapping of sections"):
        load_config(write(tmp_path, "- just\n- a list\n"))


def test_resolved_paths_are_absolute_and_yaml_round_trips(tmp_path):
    cfg = parse_config(GOOD)
    resolved = cfg.resolved()
    assert resolved.data.path == os.path.abspath("faces") and cfg.data.path == "faces"
    assert parse_config(yaml.safe_load(resolved.to_yaml())) == resolved


def test_the_written_yaml_gives_each_head_only_the_fields_its_kind_takes():
    raw = {**GOOD, "heads": {**GOOD["heads"], "years": {"kind": "distribution", "min": 0, "max": 9, "sigma": 1.5}}}
    cfg = parse_config(raw)
    heads = yaml.safe_load(cfg.to_yaml())["heads"]
    assert {"standardize", "labels", "class_weights", "label_smoothing"}.isdisjoint(heads["years"])
    assert heads["years"]["sigma"] == 1.5 and heads["years"]["max"] == 9
    assert heads["age"]["standardize"] is True and "labels" not in heads["age"]
    assert heads["race"]["class_weights"] == "balanced" and "standardize" not in heads["race"]
    assert parse_config({**raw, "heads": heads}) == cfg  # what was dropped was only defaults


def test_a_stream_source_has_steps_per_epoch_and_held_out_tables_not_a_split():
    stream = {**GOOD, "data": {"source": "webdataset", "path": "shards/{000000..000009}.tar",
                               "validation": "val.csv"}, "train": {"steps_per_epoch": 100}}  # fmt: skip
    cfg = parse_config(stream)
    assert cfg.data.is_stream() and cfg.fit_kwargs()["steps_per_epoch"] == 100
    resolved = cfg.resolved()  # no split applies: the run's config.yaml says so, and reads back
    assert (resolved.split.test, resolved.split.validation) == (0, 0)
    assert resolved.data.validation == os.path.abspath("val.csv")
    assert parse_config(yaml.safe_load(resolved.to_yaml())) == resolved
    piped = parse_config({**stream, "data": {**stream["data"], "path": "pipe:curl -s http://x/{0..9}.tar"}})
    assert piped.resolved().data.path == "pipe:curl -s http://x/{0..9}.tar"  # a URL is not made a path
    refusals = [
        ({**stream, "train": {}}, "train.steps_per_epoch: the webdataset source is a stream, which has no length"),
        ({**stream, "split": {"test": 0.2}}, "split.test is a fraction of a table; the webdataset source is a stream"),
        ({**stream, "data": {**stream["data"], "limit": 10}}, "data.limit does not apply to the webdataset source"),
        ({**GOOD, "train": {"steps_per_epoch": 5}}, "train.steps_per_epoch applies to stream sources"),
        ({**GOOD, "data": {**GOOD["data"], "test": "t.csv"}}, "data.test names the held-out rows of a stream source"),
        ({**stream, "train": {"steps_per_epoch": 0}}, "train.steps_per_epoch: must be an integer >= 1 or None; got 0"),
    ]
    for raw, words in refusals:
        with pytest.raises(ConfigError, match=re.escape(words)):
            parse_config(raw)

"""Tests for manyheads.validation: fit's option constraints, one message form, resume checks, config choices."""

import importlib
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import manyheads as mh
from conftest import make_net, make_table
from manyheads import validation
from manyheads.cli import main
from manyheads.config import ConfigError, HeadConfig, parse_config

EXAMPLES = Path(__file__).parents[1] / "examples"

# (option, bad value, how the message shows it)
BAD = [
    ("epochs", 0, "0"),
    ("epochs", 2.5, "2.5"),
    ("batch_size", True, "True"),
    ("lr", -1e-3, "-0.001"),
    ("lr", math.inf, "inf"),
    ("trunk_lr", -1e-4, "-0.0001"),
    ("weight_decay", math.nan, "nan"),
    ("warmup", 5.0, "5.0"),
    ("warmup", 1, "1"),
    ("freeze_trunk_epochs", -3, "-3"),
    ("ema", 1.0, "1.0"),
    ("precision", "fp8", "'fp8'"),
    ("schedule", "cosin", "'cosin'"),
    ("optimizer", "adamx", "'adamx'"),
    ("optimizer", nn.Linear, "<class 'Linear'>"),
    ("monitor", 3, "3"),
    ("monitor", {"val/age/mae": math.nan}, "nan for column 'val/age/mae'"),
    ("patience", 0, "0"),
    ("on_bad", "drop", "'drop'"),
    ("on_nonfinite", "ignore", "'ignore'"),
    ("checkpoint_every", -1, "-1"),
    ("workers", -2, "-2"),
    ("weights", {"age": math.nan}, "nan for head 'age'"),
    ("weights", {"age": math.inf}, "inf for head 'age'"),
    ("weights", {"gender": -1}, "-1 for head 'gender'"),
    ("weights", {"gender": "2"}, "'2' for head 'gender'"),
    ("weights", "uncertanty", "'uncertanty'"),
    ("weights", 5, "5"),
    ("losses", {"age": "maee"}, "'maee' for head 'age'"),
    ("image_size", 0, "0"),
    ("seed", 1.5, "1.5"),
]
GOOD = [
    ("epochs", 1), ("batch_size", 1), ("lr", 1e-3), ("lr", 0), ("trunk_lr", 0.0), ("trunk_lr", None),
    ("weight_decay", 0),
    ("warmup", 0), ("warmup", 0.99), ("freeze_trunk_epochs", 0), ("ema", None), ("ema", 0.0), ("precision", "bf16"),
    ("schedule", None), ("schedule", "onecycle"), ("optimizer", "AdamW"), ("optimizer", torch.optim.SGD),
    ("monitor", None), ("monitor", "val/age/mae"), ("monitor", {"val/age/mae": 1, "val/race/accuracy": -1.0}),
    ("patience", None), ("patience", 1), ("on_bad", "skip"), ("on_nonfinite", "error"), ("checkpoint_every", None),
    ("workers", 0), ("weights", None), ("weights", {"age": 0, "gender": 2.5}), ("weights", "DWA"),
    ("weights", "jd:UPGrad"), ("losses", {"age": "L1", "gender": nn.BCEWithLogitsLoss(), "race": lambda o, t: o}),
    ("image_size", None), ("seed", None), ("seed", 7),
]  # fmt: skip


def test_the_message_template():
    with pytest.raises(validation.OptionError) as error:
        validation.check_fit_options(warmup=5.0)
    assert str(error.value) == "The 'warmup' parameter of fit must be a fraction in [0, 1); got 5.0."
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize(("name", "value", "shown"), BAD, ids=[f"{n}={s}" for n, _, s in BAD])
def test_check_fit_options_refuses_naming_the_option_and_the_value(name, value, shown):
    with pytest.raises(ValueError) as error:
        validation.check_fit_options(**{name: value})
    message = str(error.value)
    assert message.startswith(f"The {name!r} parameter of fit must be ") and message.endswith(f"; got {shown}.")
    assert "\n" not in message


@pytest.mark.parametrize(("name", "value"), GOOD, ids=[f"{n}={v!r}"[:40] for n, v in GOOD])
def test_check_fit_options_accepts_good_values(name, value):
    validation.check_fit_options(**{name: value})


def test_check_fit_options_takes_fits_keywords_and_ignores_the_unconstrained():
    validation.check_fit_options(progress=False, device="cpu", callbacks=[print], resume=None, run_dir="x")
    assert validation.FIT_CONSTRAINTS.keys() <= set(_fit_keywords())  # every constraint is a fit option


def test_a_torchjd_aggregator_instance_is_accepted():
    aggregation = pytest.importorskip("torchjd.aggregation")
    validation.check_fit_options(weights=aggregation.UPGrad())
    with pytest.raises(ValueError, match="a torchjd aggregator"):
        validation.check_fit_options(weights=object())


def test_choices_come_from_the_registries(monkeypatch):
    from manyheads import balancing, optim, precision

    monkeypatch.setitem(optim.OPTIMIZERS, "lion", torch.optim.Adam)
    monkeypatch.setattr(optim, "SCHEDULES", (*optim.SCHEDULES, "step"))
    monkeypatch.setitem(precision.PRECISIONS, "fp8", None)
    monkeypatch.setitem(balancing.STRATEGIES, "famo", balancing.Balancer)
    validation.check_fit_options(optimizer="lion", schedule="step", precision="fp8", weights="famo")
    train = {"optimizer": "lion", "schedule": "step", "precision": "fp8", "weights": "famo"}
    cfg = parse_config({"heads": {"a": {"kind": "binary"}}, "train": train})  # the config follows them too
    assert (cfg.train.optimizer, cfg.train.schedule, cfg.train.precision, cfg.train.weights) == tuple(train.values())
    monkeypatch.delitem(optim.OPTIMIZERS, "sgd")
    with pytest.raises(ValueError, match=r"one of \['adam', 'adamw', 'lion'\]"):
        validation.check_fit_options(optimizer="sgd")
    with pytest.raises(ConfigError, match=r"train.optimizer: must be one of \['adam', 'adamw', 'lion'\]; got 'sgd'"):
        parse_config({"heads": {"a": {"kind": "binary"}}, "train": {"optimizer": "sgd"}})


def test_head_kinds_and_their_losses_come_from_the_head_registry(monkeypatch):
    from manyheads import heads

    class Flag(mh.Binary):
        kind = "flag"
        losses = frozenset({"focal"})

    monkeypatch.setitem(heads.REGISTRY, "flag", Flag)
    cfg = parse_config({"heads": {"f": {"kind": "flag", "loss": "focal"}}})
    assert isinstance(cfg.build_heads()["f"], Flag)
    assert validation.suitable_losses("flag") == {"focal"}
    with pytest.raises(ConfigError, match=r"heads.f.loss: loss 'bce' does not fit a flag head; must be one of"):
        parse_config({"heads": {"f": {"kind": "flag", "loss": "bce"}}})
    monkeypatch.delitem(heads.REGISTRY, "flag")
    with pytest.raises(ConfigError, match=r"heads.f.kind: must be one of \[.*'regression'.*\]; got 'flag'"):
        parse_config({"heads": {"f": {"kind": "flag"}}})


@pytest.mark.parametrize("kind", sorted(mh.heads.REGISTRY))
def test_the_config_builds_every_registered_head_kind(kind):
    cls = mh.heads.REGISTRY[kind]
    entry = {"kind": kind, **({"labels": ["a", "b", "c"]} if "labels" in cls.spec_fields and kind != "binary" else {})}
    cfg = parse_config({"heads": {"h": entry}})
    head = cfg.build_heads()["h"]
    assert type(head) is cls and head.kind == kind
    again = parse_config(yaml.safe_load(cfg.to_yaml()))  # the written config.yaml reads back as the same head
    assert again == cfg and again.build_heads()["h"].spec() == head.spec()


def test_a_kinds_own_fields_go_to_the_head_and_round_trip():
    kind = next((k for k, c in mh.heads.REGISTRY.items() if set(c.spec_fields) - set(HeadConfig.model_fields)), None)
    if kind is None:
        pytest.skip("no registered head kind has fields of its own")
    cls = mh.heads.REGISTRY[kind]
    defaults = cls().spec()  # e.g. a distribution head's step, sigma and answer
    field = next(f for f in cls.spec_fields if f not in HeadConfig.model_fields and isinstance(defaults[f], float))
    cfg = parse_config({"heads": {"h": {"kind": kind, field: defaults[field] / 2}}})
    assert cfg.build_heads()["h"].spec()[field] == defaults[field] / 2
    assert yaml.safe_load(cfg.to_yaml())["heads"]["h"][field] == defaults[field] / 2  # flat in the YAML
    assert parse_config(yaml.safe_load(cfg.to_yaml())) == cfg
    with pytest.raises(ConfigError, match=rf"heads.h.{field}: unknown key"):
        parse_config({"heads": {"h": {"kind": "binary", field: 1.0}}})  # another kind's field


# ---- mh.fit calls the checks first (these wait for fit to call validation.check_fit_options) -------------


def _fit_keywords() -> list[str]:
    import inspect

    return [p.name for p in inspect.signature(mh.fit).parameters.values() if p.kind is p.KEYWORD_ONLY]


@pytest.mark.parametrize(("name", "value", "shown"), BAD, ids=[f"{n}={s}" for n, _, s in BAD])
def test_fit_refuses_a_bad_option_first(name, value, shown, monkeypatch):
    """Waits for the wiring: fit must call validation.check_fit_options before anything else."""
    monkeypatch.setattr("manyheads.encoding.encode", _never)  # refused before any data is touched
    with pytest.raises(ValueError) as error:
        mh.fit(make_net(), make_table(40), **{"epochs": 1, "progress": False, name: value})
    message = str(error.value)
    assert message.startswith(f"The {name!r} parameter of fit must be ") and message.endswith(f"; got {shown}.")


def _never(*args, **kwargs):
    raise AssertionError("fit encoded the data before checking its options")


# ---- options records and resume checks -----------------------------------------------------------------


def test_options_record_is_json_safe_and_names_objects():
    from manyheads.images import Augment

    def my_loss(output, target):
        return (output - target).abs()

    record = validation.options_record(
        epochs=4, lr=1e-3, weights={"age": 2}, optimizer=torch.optim.SGD, schedule=None,
        losses={"age": my_loss, "race": nn.CrossEntropyLoss(), "gender": "bce"}, augment=Augment(jitter=0.2),
        device=torch.device("cpu"), run_dir=Path("runs/x"), callbacks=[print], ema=math.nan, tensor=torch.ones(2),
    )  # fmt: skip
    assert json.loads(json.dumps(record, allow_nan=False)) == record
    assert record["optimizer"] == "torch.optim.sgd.SGD" and record["weights"] == {"age": 2}
    assert record["losses"]["age"].endswith("my_loss") and record["losses"]["gender"] == "bce"
    assert record["losses"]["race"] == "torch.nn.modules.loss.CrossEntropyLoss"
    assert record["augment"]["jitter"] == 0.2 and record["augment"]["type"].endswith("Augment")
    assert record["device"] == "cpu" and record["run_dir"] == "runs/x" and record["callbacks"] == ["print"]
    assert record["ema"] == "nan" and record["tensor"] == "torch.Tensor"
    again = validation.options_record(augment=Augment(jitter=0.3))
    assert again["augment"] != record["augment"]  # a changed augmentation is a changed option


SAVED = validation.options_record(
    epochs=4, batch_size=64, lr=1e-3, schedule=None, warmup=0.3, image_size=32, seed=0, precision="fp32",
    weights={"age": 1.0}, losses={"age": "mae"}, progress=True, device="cpu", workers=2, cache_dir=None,
    run_dir="runs/x", checkpoint_every=None, callbacks=None,
)  # fmt: skip


def test_resume_refuses_a_changed_option_naming_it_both_values_and_the_run():
    with pytest.raises(ValueError) as error:
        validation.check_resume(SAVED, {**SAVED, "batch_size": 32}, "runs/x")
    assert str(error.value) == (
        "resume: the run in runs/x was trained with batch_size=64; this call has batch_size=32. "
        "Resume with the run's own settings, or start a new run."
    )
    for key, value in [("image_size", 48), ("lr", 1e-2), ("weights", {"age": 2.0}), ("losses", {"age": "mse"}),
                       ("precision", "bf16"), ("seed", 1), ("warmup", 0.1), ("epochs", 3)]:  # fmt: skip
        with pytest.raises(ValueError, match=rf"trained with {key}=.*; this call has {key}="):
            validation.check_resume(SAVED, {**SAVED, key: value}, "runs/x")


def test_resume_allows_the_safe_changes():
    safe = {"progress": False, "device": "cuda", "workers": 0, "cache_dir": "/tmp/c", "run_dir": "elsewhere",
            "checkpoint_every": 100, "callbacks": ["print"], "seed": None, "epochs": 10}  # fmt: skip
    validation.check_resume(SAVED, {**SAVED, **safe}, "runs/x")
    validation.check_resume(SAVED, {"epochs": 4, "new_option": 1}, "runs/x")  # options one side lacks: not compared


def test_resume_extends_epochs_only_without_a_schedule():
    constant = {**SAVED, "schedule": "constant"}
    validation.check_resume(constant, {**constant, "epochs": 8}, "runs/x")
    cosine = {**SAVED, "schedule": "cosine"}
    with pytest.raises(ValueError, match=r"epochs=4; this call has epochs=8\. With schedule='cosine' .* extended"):
        validation.check_resume(cosine, {**cosine, "epochs": 8}, "runs/x")


DEMO_RAW = yaml.safe_load((EXAMPLES / "shapes.yaml").read_text())


def _demo(**changes):
    raw = json.loads(json.dumps(DEMO_RAW))
    for key, value in changes.items():
        section, field = key.split("__")
        raw[section][field] = value
    return parse_config(raw)


def test_config_changes_lists_what_matters():
    old = _demo()
    assert validation.config_changes(old, old) == []
    assert validation.config_changes(old, _demo(model__image_size=48)) == [("model.image_size", 24, 48)]
    assert validation.config_changes(old, _demo(model__backbone="resnet34")) == [
        ("model.backbone", "resnet18", "resnet34")
    ]
    safe = _demo(train__epochs=8, train__workers=0, train__device="cpu", train__checkpoint_every=5, data__path="x")
    assert validation.config_changes(old, safe) == []
    cosine = _demo(train__schedule="cosine")
    assert validation.config_changes(cosine, _demo(train__schedule="cosine", train__epochs=8)) == [
        ("train.epochs", 4, 8)
    ]
    heads = {**DEMO_RAW["heads"], "extra": {"kind": "binary"}}
    assert [key for key, *_ in validation.config_changes(old, _demo(**{"heads__extra": heads["extra"]}))] == [
        "heads.extra"
    ]
    with pytest.raises(ValueError, match=r"trained with train.epochs=4; this call has train.epochs=8\. With sched"):
        validation.check_config_resume(cosine, _demo(train__schedule="cosine", train__epochs=8), "runs/x")


# ---- manyheads train --resume --------------------------------------------------------------------------

TINY_DEMO = ["data.limit=64", "train.epochs=1"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("resume") / "run"
    code = main(["train", str(EXAMPLES / "shapes.yaml"), "--out", str(run), "--quiet", *TINY_DEMO])
    assert code == 0
    return run


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ("model.image_size=48", "model.image_size=24; this call has model.image_size=48"),
        ("model.backbone=mobilenet_v3_small", "model.backbone='resnet18'; this call has model.backbone='mobi"),
        ("heads.size.loss=huber", "heads.size.loss='mae'; this call has heads.size.loss='huber'"),
    ],
)
def test_cli_resume_refuses_a_changed_model_before_writing(demo_run, capsys, change, words):
    before = {name: (demo_run / name).read_bytes() for name in ("config.yaml", "split.json", "checkpoint.pt")}
    capsys.readouterr()
    code = main(["train", str(EXAMPLES / "shapes.yaml"), "--out", str(demo_run), "--resume", "--quiet",
                 *TINY_DEMO, change])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"manyheads: error: resume: the run in {demo_run} was trained with ")
    assert words in err and err.count("\n") == 1
    assert {name: (demo_run / name).read_bytes() for name in before} == before  # nothing was written


def test_cli_resume_with_more_epochs_continues(demo_run, capsys):
    code = main(["train", str(EXAMPLES / "shapes.yaml"), "--out", str(demo_run), "--resume", "--quiet",
                 "data.limit=64", "train.epochs=2"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert yaml.safe_load((demo_run / "config.yaml").read_text())["train"]["epochs"] == 2
    assert len((demo_run / "history.csv").read_text().strip().splitlines()) == 1 + 2  # header, two epochs


# ---- compare checks everything before training ----------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"strategies": ("constant", "uncertanty")}, "The 'strategies' parameter of compare must be "),
        ({"weights": "uncertanty"}, "The 'weights' parameter of compare must be "),
        ({"warmup": 5.0}, "The 'warmup' parameter of compare must be a fraction in [0, 1); got 5.0."),
        ({"seeds": (0, 1.5)}, "The 'seeds' parameter of compare must be an integer; got 1.5."),
    ],
)
def test_compare_refuses_bad_options_before_training(monkeypatch, options, words):
    trained = []
    module = importlib.import_module("manyheads.compare")  # mh.compare is the function, not the module
    monkeypatch.setattr(module, "fit", lambda *args, **kwargs: trained.append(kwargs))
    with pytest.raises(ValueError) as error:
        mh.compare(lambda heads: make_net(heads=heads), make_table(40), heads={"age": mh.Regression()}, **options)
    assert words in str(error.value) and trained == []

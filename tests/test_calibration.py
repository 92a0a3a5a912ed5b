"""Calibration: temperatures, conformal intervals, and calibrated answers everywhere a net answers."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import manyheads as mh
from conftest import make_net, make_table
from manyheads.calibration import GRID, Conformal, Scores, fit_temperature
from manyheads.heads import head_from_spec


def _softmax_labels(logits: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.multinomial(torch.softmax(logits, dim=1), 1, generator=torch.Generator().manual_seed(seed))[:, 0]


@pytest.mark.parametrize("true_temperature", [0.5, 2.5])
def test_temperature_scaling_recovers_a_known_temperature(true_temperature):
    gen = torch.Generator().manual_seed(0)
    true_logits = torch.randn(20_000, 5, generator=gen) * 2
    labels = _softmax_labels(true_logits, 1)
    head = mh.Categorical(list("abcde"))
    # the model's logits are the true ones times T: over-confident for T > 1, under-confident for T < 1
    fitted = head.calibrate(true_logits * true_temperature, labels)
    assert head.temperature == pytest.approx(true_temperature, rel=0.05)
    assert fitted["nll_after"] <= fitted["nll_before"]
    assert torch.equal(head.predicted(true_logits), head.uncalibrated().predicted(true_logits))  # answers unchanged


def test_binary_temperature_and_the_golden_section_search():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(20_000, generator=gen) * 2
    labels = torch.bernoulli(torch.sigmoid(z), generator=gen)
    head = mh.Binary(["no", "yes"])
    head.calibrate(z * 3.0, labels)
    assert head.temperature == pytest.approx(3.0, rel=0.05)
    assert fit_temperature(lambda t: (math.log(t) - math.log(1.7)) ** 2) == pytest.approx(1.7, rel=1e-3)


def _heteroscedastic(n: int, seed: int):
    """y = 10 x + noise whose spread grows from 0.2 to 3.2 with x; the prediction is the true mean."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, n)
    sd = 0.2 + 3 * x
    return x, 10 * x + rng.normal(size=n) * sd, sd


def _covered(low, high, y):
    return float(((y >= low.numpy()) & (y <= high.numpy())).mean())


def test_conformal_intervals_reach_their_coverage_and_the_adaptive_one_is_narrower_where_noise_is_small():
    head = mh.Regression(standardize=False)
    x, y, _ = _heteroscedastic(2_000, seed=0)
    head.calibrate(torch.tensor(10 * x, dtype=torch.float32), torch.tensor(y), coverage=0.9)
    x_test, y_test, _ = _heteroscedastic(10_000, seed=1)
    output = torch.tensor(10 * x_test, dtype=torch.float32)
    plain, adaptive = head.interval(output, "plain"), head.interval(output, "adaptive")
    for low, high in (plain, adaptive):
        assert 0.88 <= _covered(low, high, y_test) <= 0.92
    quiet = x_test < 0.2
    width = {kind: (high - low).numpy() for kind, (low, high) in (("plain", plain), ("adaptive", adaptive))}
    assert width["adaptive"][quiet].mean() < 0.5 * width["plain"][quiet].mean()
    assert width["adaptive"].mean() < width["plain"].mean()
    assert head.conformal.method == "binned" and len(head.conformal.edges) == 7  # 2,000 rows: 8 groups of 250


def test_a_distribution_head_scales_its_interval_with_its_own_spread():
    head = mh.Distribution(min=-10, max=30, step=0.5)
    values = head.values()

    def outputs(n, seed):  # each row's predicted distribution is the true noise distribution
        x, y, sd = _heteroscedastic(n, seed)
        mean, sd = torch.tensor(10 * x).float()[:, None], torch.tensor(sd).float()[:, None]
        return -((values[None, :] - mean) ** 2) / (2 * sd**2), y, x

    output, y, _ = outputs(2_000, 0)
    head.calibrate(output, torch.tensor(y), coverage=0.9)
    assert head.conformal.method == "spread"
    output, y, x = outputs(10_000, 1)
    low, high = head.interval(output)
    assert 0.88 <= _covered(low, high, y) <= 0.92
    plain_low, plain_high = head.interval(output, "plain")
    assert (high - low)[x < 0.2].mean() < 0.5 * (plain_high - plain_low)[x < 0.2].mean()


def test_scores_keep_the_exact_order_statistic_or_the_next_above():
    scores = np.arange(1, 101, dtype=float)  # n = 100: the 90 % quantile is the ceil(101 * 0.9) = 91st smallest
    assert Scores.of(scores).quantile(0.9) == 91
    assert Scores.of(scores[:8]).quantile(0.9) == math.inf  # 8 rows cannot give a 90 % interval
    assert 901 <= Scores.of(np.arange(1, 1001.0)).quantile(0.9) <= 905  # at or just above the 901st, never below
    fitted = Conformal.fit(np.zeros(9), np.arange(9.0), None, 0.9)
    assert len(fitted.plain.levels) == GRID and fitted.plain.quantile(0.9) == 8
    head = mh.Regression()
    head.calibrate(torch.zeros(9), torch.arange(9.0), coverage=0.8)
    with pytest.raises(ValueError, match="needs more calibration rows than the 9"):
        head.set_coverage(0.95)


def test_set_coverage_narrows_and_widens_the_interval_from_the_stored_scores():
    head = mh.Regression(standardize=False)
    x, y, _ = _heteroscedastic(1_000, 0)
    head.calibrate(torch.tensor(10 * x).float(), torch.tensor(y), coverage=0.9)
    output = torch.tensor([2.0, 8.0])
    wide = head.interval(output)
    mh.set_coverage({"y": head}, 0.5)
    narrow = head.interval(output)
    assert ((narrow[1] - narrow[0]) < (wide[1] - wide[0])).all() and head.coverage == 0.5


def _fitted(calibration=0.25, **kw):
    table = make_table(600)
    net = make_net()
    result = mh.fit(net, table, epochs=2, seed=0, progress=False, calibration=calibration, **kw)
    return result, table


def test_fit_calibrates_on_a_held_out_fraction_and_the_net_answers_with_intervals():
    result, table = _fitted(abstain={"gender": 0.9})
    assert set(result.calibration) == {"age", "gender", "race"}
    assert result.calibration["age"]["labels"] == 150  # a quarter of 600 rows, not trained on
    answers = result.net.predict(table["x"][:5])
    assert len(answers["age_interval"]) == 5
    assert all(low <= value <= high for value, (low, high) in zip(answers["age"], answers["age_interval"]))
    probabilities = result.net.predict_proba(table["x"][:5])["gender"]
    assert answers["gender_uncertain"] == [bool(p.max() < 0.9) for p in probabilities]
    assert "race_uncertain" not in answers and "race_interval" not in answers


def test_calibration_on_the_validation_rows_and_the_errors_that_name_what_to_do():
    net = make_net()
    result = mh.fit(net, make_table(300), validation=0.2, calibration="validation", epochs=1, seed=0, progress=False)
    assert result.calibration["gender"]["labels"] == 60
    with pytest.raises(ValueError, match="calibration='validation' needs validation rows"):
        mh.fit(make_net(), make_table(100), calibration="validation", epochs=1, progress=False)
    with pytest.raises(ValueError, match="'calibration' parameter of fit"):
        mh.fit(make_net(), make_table(100), calibration=1.5, epochs=1, progress=False)
    with pytest.raises(ValueError, match="abstain= names heads \\['hair'\\]"):
        mh.calibrate(result.net, make_table(50), abstain={"hair": 0.5})


def test_a_dataframe_keeps_its_row_labels_when_calibration_rows_are_held_out():
    table = make_table(200)
    df = pd.DataFrame({"x": list(table["x"]), "age": table["age"], "gender": table["gender"], "race": table["race"]})
    df.index = [f"p{i}" for i in range(200)]
    bad = [f"p{i}" for i in range(10)]
    df.loc[bad, "race"] = "zebra"
    result = mh.fit(make_net(), df, calibration=0.2, epochs=1, seed=0, progress=False, on_bad="skip")
    named = [row.row for row in result.skipped]
    assert named and set(named) <= set(bad)  # the index labels, not positions among the kept rows
    assert result.calibration["race"]["labels"] + len(named) <= 50


def test_calibration_survives_save_and_load_and_an_uncalibrated_net_answers_as_before(tmp_path):
    result, table = _fitted()
    net = result.net
    path = net.save(tmp_path / "m.safetensors")
    loaded = mh.load(path, trunk=make_net().trunk)
    assert loaded.predict(table["x"][:20]) == net.predict(table["x"][:20])
    for name, p in net.predict_proba(table["x"][:20]).items():
        np.testing.assert_allclose(loaded.predict_proba(table["x"][:20])[name], p, rtol=1e-6)
    spec = json.loads(json.dumps(loaded.spec()))
    assert spec["heads"]["gender"]["calibration"]["temperature"] == net.heads["gender"].temperature

    plain = make_net()  # never calibrated: no calibration in its spec, no extra answers, untouched probabilities
    answers = plain.predict(table["x"][:4])
    assert set(answers) == {"age", "gender", "race"}
    assert all("calibration" not in h for h in plain.spec()["heads"].values())
    raw = plain(torch.as_tensor(table["x"][:4]))
    assert torch.equal(plain.heads["race"].proba(raw["race"]), torch.softmax(raw["race"], dim=1))
    assert plain.heads["age"].readout(raw["age"]).shape == (4,)


def test_a_damaged_calibration_record_is_refused_naming_the_head():
    head = mh.Categorical(["a", "b"])
    with pytest.raises(ValueError, match="head 'race'.*positive finite 'temperature'"):
        head_from_spec({**head.spec(), "calibration": {"temperature": -1}}, "race")
    age = mh.Regression()
    age.calibrate(torch.randn(50), torch.randn(50))
    record = age.file_spec()
    record["calibration"]["plain"]["levels"] = record["calibration"]["plain"]["levels"][:-1]
    with pytest.raises(ValueError, match=f"head 'age'.*{GRID} finite numbers"):
        head_from_spec(record, "age")


def test_onnx_answers_calibrated_probabilities_and_intervals_like_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    from manyheads.export import OnnxModel, export_onnx

    result, table = _fitted(calibration=0.7)  # 420 rows: the adaptive interval has two groups
    net = result.net
    assert len(net.heads["age"].conformal.edges) == 1
    path = export_onnx(net, tmp_path / "m.onnx")
    model = OnnxModel(path)
    x = np.asarray(table["x"][:64])
    ours, theirs = net.predict(x), model.predict(x)
    assert ours["gender"] == theirs["gender"] and ours["race"] == theirs["race"]
    np.testing.assert_allclose(theirs["age_interval"], ours["age_interval"], rtol=1e-4, atol=1e-4)
    for name, p in net.predict_proba(x).items():
        np.testing.assert_allclose(model.predict_proba(x)[name], p, rtol=1e-4, atol=1e-5)


def test_the_service_answers_the_interval_beside_the_value():
    pytest.importorskip("fastapi")
    import io

    import httpx
    from PIL import Image

    from manyheads.serving import create_app, serve_in_thread

    df = mh.datasets.shapes(240, size=24, seed=0)
    net = mh.MultiHeadNet("resnet18", {"size": mh.Regression(), "shape": mh.Categorical(["circle", "square",
                                                                                          "triangle"])},
                          image_size=24)  # fmt: skip
    mh.fit(net, df.drop(columns=["filled"]), epochs=1, seed=0, progress=False, calibration=0.3, augment=False)
    buffer = io.BytesIO()
    Image.fromarray(df["image"].iloc[0]).save(buffer, format="PNG")
    with serve_in_thread(create_app(net)) as url:
        answer = httpx.post(url + "/predict", files={"files": ("a.png", buffer.getvalue())}).json()
    entry = answer["predictions"][0]
    low, high = entry["size"]["interval"]
    assert low <= entry["size"]["value"] <= high
    assert "interval" not in entry["shape"] and sum(entry["shape"]["probabilities"].values()) == pytest.approx(1)


def test_the_report_shows_calibration_error_and_coverage_by_group(tmp_path):
    from manyheads.reports import evaluate_report

    result, _ = _fitted(calibration=0.5)
    test = make_table(400, seed=5)
    report = evaluate_report(result.net, test, tmp_path, inputs="x")
    trust = report["trust"]
    assert set(trust["classifiers"]) == {"gender", "race"} and set(trust["numbers"]) == {"age"}
    gender = trust["classifiers"]["gender"]
    assert 0 <= gender["ece_after"] <= 1 and (tmp_path / gender["diagram"]).is_file()
    from manyheads.inference import encode_for, raw_outputs
    from manyheads.reports.trust import calibration_error

    encoded = encode_for(result.net, test, inputs="x")
    raw = raw_outputs(result.net, encoded)["gender"]
    head, target = result.net.heads["gender"], encoded.targets["gender"]
    assert gender["ece_before"] == pytest.approx(calibration_error(head.uncalibrated().proba(raw), target))
    assert gender["ece_after"] == pytest.approx(calibration_error(head.proba(raw), target))
    age = trust["numbers"]["age"]
    assert 0.8 <= age["overall"]["adaptive"]["coverage"] <= 1 and set(age["groups"]) == {"true age", "gender", "race"}
    assert sum(g["plain"]["rows"] for g in age["groups"]["race"]) == 400
    text = (tmp_path / "report.md").read_text()
    assert "## Can you trust the answers?" in text and "ECE after" in text and "90% intervals" in text

    uncalibrated = evaluate_report(make_net(), test, tmp_path / "plain", inputs="x")
    assert "trust" not in uncalibrated
    assert "Can you trust" not in (tmp_path / "plain" / "report.md").read_text()


def test_yaml_keeps_calibration_rows_apart_and_predict_answers_intervals(tmp_path, capsys):
    from manyheads import runs
    from manyheads.cli import main
    from manyheads.config import ConfigError, parse_config

    raw = {"data": {"source": "shapes", "limit": 200, "inputs": "image"},
           "model": {"backbone": "resnet18", "image_size": 24},
           "heads": {"size": {"kind": "regression"}, "shape": {"kind": "categorical",
                                                              "labels": ["circle", "square", "triangle"]}},
           "train": {"epochs": 1, "augment": False},
           "split": {"test": 0.15, "validation": 0.1, "calibration": 0.2}}  # fmt: skip
    cfg = parse_config(raw)
    split = runs.Split.of(200, cfg.split)
    assert len(split.calibration) == 40 and not set(split.calibration) & set(split.train)
    before = runs.Split.of(200, parse_config({**raw, "split": {"test": 0.15, "validation": 0.1}}).split)
    assert set(split.test) == set(before.test) and set(split.validation) == set(before.validation)
    result, report = runs.train(cfg, tmp_path / "run", progress=False)
    assert result.calibration["size"]["labels"] == 40 and "size" in report["trust"]["numbers"]

    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(mh.datasets.shapes(1, size=24)["image"].iloc[0]).save(image)
    assert main(["predict", str(tmp_path / "run"), str(image), "--json", "--coverage", "0.5"]) == 0
    narrow = json.loads(capsys.readouterr().out)[0]["predictions"]["size_interval"]
    assert main(["predict", str(tmp_path / "run"), str(image), "--json"]) == 0
    wide = json.loads(capsys.readouterr().out)[0]["predictions"]["size_interval"]
    assert narrow[1] - narrow[0] < wide[1] - wide[0]

    with pytest.raises(ConfigError, match="split.calibration is 0"):
        parse_config({**raw, "split": {"test": 0.15}, "calibrate": {"rows": "calibration"}})
    with pytest.raises(ConfigError, match="coverage"):
        parse_config({**raw, "calibrate": {"coverage": 90}})

"""Tests for manyheads.robustness and the report's robustness section: seeded shifts of the decoded photo."""

import json
import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageFilter
from torch import nn

import manyheads as mh
from manyheads.cli import _parser, main
from manyheads.reports.evaluation import evaluate_report
from manyheads.robustness import SHIFTS, Shift, scores, shift_image, shift_names, shifted_column

RACES = ["a", "b", "c"]


def noise(width: int = 80, height: int = 60, seed: int = 0) -> Image.Image:
    """A colourful random image: every shift has something to change."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_faces(folder, n: int = 10, suffix: str = ".png") -> list[str]:
    """``n`` 100 px images in ``folder``: noise with a bright square whose place varies."""
    folder.mkdir()
    paths = []
    for i in range(n):
        image = np.asarray(noise(100, 100, seed=i)).copy() // 2
        image[10 + 5 * i : 50 + 5 * i, 20:70] = (230, 200, 40 + 20 * i)
        paths.append(str(folder / f"face{i}{suffix}"))
        Image.fromarray(image).save(paths[-1])
    return paths


@pytest.fixture
def table(tmp_path):
    paths = write_faces(tmp_path / "faces")
    # ages near the tiny net's answers (about -0.1), so the error moves visibly with the pixels
    return {"image": paths, "age": [0.05 * i - 0.3 for i in range(10)],
            "gender": ["male", "female"] * 5, "race": [RACES[i % 3] for i in range(10)]}  # fmt: skip


@pytest.fixture
def net():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    heads = {"age": mh.Regression(), "gender": mh.Binary(["male", "female"]), "race": mh.Categorical(RACES)}
    return mh.MultiHeadNet(trunk, heads, image_size=24).eval()


# ---- the shifts --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SHIFTS))
def test_every_shift_is_deterministic_for_a_seed_and_changes_the_image(name):
    image = noise()
    first = np.asarray(shift_image(name, image, seed=3, row=5))
    assert np.array_equal(first, np.asarray(shift_image(name, image, seed=3, row=5)))
    assert first.shape == np.asarray(image).shape and first.dtype == np.uint8  # same size, RGB
    assert np.abs(first.astype(int) - np.asarray(image)).mean() > 1  # it does change the photo
    assert np.array_equal(np.asarray(image), np.asarray(noise()))  # and leaves the original alone


def test_zoom_out_draws_its_scale_from_the_seed_and_the_row():
    image = noise()
    drawn = {np.asarray(shift_image("zoom_out", image, seed=s)).tobytes() for s in range(5)}
    assert len(drawn) > 1  # the scale is random: other seeds, other pixels
    by_row = {np.asarray(shift_image("zoom_out", image, seed=0, row=r)).tobytes() for r in range(5)}
    assert len(by_row) > 1


def test_zoom_out_puts_the_original_content_at_60_to_70_percent_of_the_frame():
    image = np.full((200, 200, 3), 128, np.uint8)  # a uniform background: the repeated border is the same grey
    image[40:160, 40:160] = (255, 0, 0)  # the "face": a red square of 120 px, 60 % of the frame
    scales = []
    for row in range(20):
        out = np.asarray(shift_image("zoom_out", Image.fromarray(image), seed=0, row=row)).astype(int)
        assert out.shape == (200, 200, 3)
        red = (out[..., 0] > 200) & (out[..., 1] < 60)
        ys, xs = np.nonzero(red)
        width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        assert abs((xs.max() + xs.min()) / 2 - 99.5) <= 1.5 and abs((ys.max() + ys.min()) / 2 - 99.5) <= 1.5
        scales.append(((width + height) / 2) / 120)
    # the whole original frame (200 px) shrinks by the same scale: to 60-70 % of the frame's side
    assert 0.6 - 2 / 120 <= min(scales) and max(scales) <= 0.7 + 2 / 120
    assert max(scales) - min(scales) > 0.03  # drawn per row, not one fixed scale


def test_shifted_column_is_deterministic_and_at_the_nets_size(table):
    first = shifted_column(table["image"], "zoom_out", 24, seed=0, progress=False)
    assert first.dtype == torch.uint8 and first.shape == (10, 3, 24, 24)
    assert torch.equal(first, shifted_column(table["image"], "zoom_out", 24, seed=0, progress=False))
    assert not torch.equal(first, shifted_column(table["image"], "zoom_out", 24, seed=1, progress=False))


def test_shift_names_resolve_subsets_and_refuse_unknown_names():
    assert shift_names(True) == shift_names("all") == list(SHIFTS)
    assert shift_names("zoom_out, jpeg30") == ["zoom_out", "jpeg30"]
    assert shift_names(["blur", "blur"]) == ["blur"]
    with pytest.raises(ValueError, match="unknown robustness shift.*'zoom'.*zoom_out, jpeg30"):
        shift_names("zoom,jpeg30")
    with pytest.raises(ValueError, match="unknown robustness shift"):
        shift_names("none")  # the clean row's name is no shift


def test_the_shifted_pipeline_decodes_like_the_clean_one(net, tmp_path, monkeypatch):
    """An identity shift through the robustness path gives exactly the clean metrics, JPEG drafts and bad files too."""
    paths = write_faces(tmp_path / "jpegs", suffix=".jpg")  # 100 px JPEGs: decoded with draft at 24 px
    (tmp_path / "jpegs" / "broken.jpg").write_bytes(b"not a jpeg")
    table = {"image": [*paths, str(tmp_path / "jpegs" / "broken.jpg")], "age": [float(i) for i in range(11)]}
    heads = {"age": mh.Regression()}
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    small = mh.MultiHeadNet(trunk, heads, image_size=24).eval()
    monkeypatch.setitem(SHIFTS, "identity", Shift("identity", "the image as it is", lambda image, rng: image))
    clean = mh.evaluate(small, table, on_bad="skip")["age"]
    assert clean["labels"] == 10
    assert scores(small, table, ["identity"], progress=False)["identity"]["age"] == clean["mae"]


# ---- the report section ------------------------------------------------------------------------


def _by_hand(net, table, transform) -> dict:
    """Each head's primary metric on images shifted here with PIL, scored through mh.evaluate."""
    shifted = [transform(Image.open(path).convert("RGB")) for path in table["image"]]
    metrics = mh.evaluate(net, {**table, "image": shifted})
    return {name: metrics[name][head.primary] for name, head in net.heads.items()}


def test_the_report_gains_one_row_per_shift_and_a_column_per_head(net, table, tmp_path):
    report = evaluate_report(net, table, tmp_path, inputs="image", robustness=True)
    rows = report["robustness"]["shifts"]
    assert [r["shift"] for r in rows] == ["none", *SHIFTS]
    clean = {name: h["metrics"][h["primary"]] for name, h in report["heads"].items()}
    assert rows[0]["metrics"] == clean and set(rows[0]["change"].values()) == {0.0}
    for row in rows[1:]:
        assert set(row["metrics"]) == set(net.heads)
        assert row["change"] == {n: pytest.approx(row["metrics"][n] - clean[n]) for n in net.heads}
    found = {r["shift"]: r["metrics"] for r in rows}
    blur = _by_hand(net, table, lambda image: image.filter(ImageFilter.GaussianBlur(0.01 * min(image.size))))
    assert found["blur"] == pytest.approx(blur, rel=1e-6)
    greyscale = _by_hand(net, table, lambda image: image.convert("L").convert("RGB"))
    assert found["greyscale"] == pytest.approx(greyscale, rel=1e-6)
    assert found["blur"]["age"] != pytest.approx(clean["age"], rel=1e-3)  # the shift does move the answers
    assert json.loads((tmp_path / "metrics.json").read_text())["robustness"] == report["robustness"]
    text = (tmp_path / "report.md").read_text()
    section = text.split("## Robustness")[1]
    header = "| shift | what | age mae ↓ | gender accuracy ↑ | race accuracy ↑ |"
    assert header in section
    for shift in ["none", *SHIFTS]:
        assert len(re.findall(rf"^\| {shift} \|", section, re.MULTILINE)) == 1
    assert f"| {found['blur']['age']:.4g} ({found['blur']['age'] - clean['age']:+.3g}) |" in section


def test_a_subset_of_shifts_and_a_misspelt_one(net, table, tmp_path):
    report = evaluate_report(net, table, tmp_path / "some", inputs="image", robustness="zoom_out,jpeg30")
    assert [r["shift"] for r in report["robustness"]["shifts"]] == ["none", "zoom_out", "jpeg30"]
    with pytest.raises(ValueError, match="unknown robustness shift.*'jepg30'"):
        evaluate_report(net, table, tmp_path / "bad", inputs="image", robustness="zoom_out,jepg30")
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())  # refused before any work


def _without_section(text: str) -> str:
    return re.sub(r"## Robustness.*?(?=^## |\Z)", "", text, flags=re.DOTALL | re.MULTILINE)


def test_without_the_option_the_report_is_unchanged(net, table, tmp_path):
    plain = evaluate_report(net, table, tmp_path / "plain", inputs="image")
    shifted = evaluate_report(net, table, tmp_path / "shifted", inputs="image", robustness=["blur"])
    assert "robustness" not in plain and "robustness" not in json.loads((tmp_path / "plain/metrics.json").read_text())
    assert {k: v for k, v in shifted.items() if k != "robustness"} == plain
    text = (tmp_path / "plain" / "report.md").read_text()
    assert "Robustness" not in text
    assert _without_section((tmp_path / "shifted" / "report.md").read_text()).rstrip() == text.rstrip()


def test_robustness_needs_images(tmp_path):
    torch.manual_seed(0)
    net = mh.MultiHeadNet(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), {"y": mh.Regression()})
    table = {"x": np.ones((4, 3), np.float32), "y": [1.0, 2.0, 3.0, 4.0]}
    with pytest.raises(ValueError, match="robustness shifts act on images"):
        evaluate_report(net, table, tmp_path, inputs="x", robustness=True)


# ---- the command line --------------------------------------------------------------------------


def test_the_cli_help_names_every_registered_shift():
    evaluate = _parser()._subparsers._group_actions[0].choices["evaluate"]
    text = " ".join(evaluate.format_help().split())
    assert all(name in text for name in SHIFTS)
    assert evaluate.parse_args(["run", "--robustness"]).robustness == "all"
    assert evaluate.parse_args(["run", "--robustness", "blur,jpeg30"]).robustness == "blur,jpeg30"
    assert evaluate.parse_args(["run"]).robustness is None


def test_evaluate_robustness_from_the_command_line(tmp_path, capsys):
    data = tmp_path / "faces"
    data.mkdir()
    for i in range(6):
        noise(48, 48, seed=i).save(data / f"{20 + i}_{i % 2}_{i % 5}_2017{i:06d}.jpg")
    config = {"data": {"source": "utkface", "path": str(data)},
              "heads": {"age": {"kind": "regression"}, "gender": {"kind": "binary", "labels": ["male", "female"]}},
              "model": {"backbone": "mobilenet_v3_small", "pretrained": False, "image_size": 32}}  # fmt: skip
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    heads = {"age": mh.Regression(), "gender": mh.Binary(["male", "female"])}
    mh.MultiHeadNet("mobilenet_v3_small", heads, image_size=32).save(run / "model.safetensors")
    assert main(["evaluate", str(run), "--robustness", "blurr"]) == 2
    assert "unknown robustness shift" in capsys.readouterr().err
    out = tmp_path / "report"
    code = main(["evaluate", str(run), "--data", str(data), "--robustness", "blur,greyscale", "--out", str(out)])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert "robustness: 2 shifts (blur, greyscale)" in printed and "  blur: age " in printed
    rows = json.loads((out / "metrics.json").read_text())["robustness"]["shifts"]
    assert [r["shift"] for r in rows] == ["none", "blur", "greyscale"]
    assert "| greyscale |" in (out / "report.md").read_text()

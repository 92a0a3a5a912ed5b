"""Smoke tests of the benchmark scripts: each runs with --tiny in seconds and prints its table."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common  # noqa: E402
import inference  # noqa: E402
import overhead  # noqa: E402
import real_data  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    """A dozen random JPEGs named as UTKFace names them: age_gender_race_datetime.jpg.chip.jpg."""
    folder = tmp_path_factory.mktemp("utkface")
    rng = np.random.default_rng(0)
    for i in range(12):
        pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{10 + 5 * i}_{i % 2}_{i % 5}_2017011{i:09d}.jpg.chip.jpg")
    return folder


def table_rows(section: str) -> list[list[str]]:
    """Body rows of every Markdown table in ``section``, as cells."""
    lines = [line for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_overhead_tiny_prints_a_row_per_contender_with_ratios(capsys):
    section = overhead.main(["--tiny"])
    assert section in capsys.readouterr().out
    rows = {row[0]: row for row in table_rows(section)}
    assert set(overhead.CONTENDERS.values()) <= set(rows)
    assert rows[overhead.CONTENDERS["hand"]][4] == "1"  # the reference's ratio to itself
    for name in ("mh", "mh_metrics"):
        assert float(rows[overhead.CONTENDERS[name]][1]) > 0 and float(rows[overhead.CONTENDERS[name]][4]) > 0
    assert "Command: `python benchmarks/overhead.py --tiny`" in section


def test_overhead_memory_probe_reports_rss_growth(capsys):
    overhead.main(["--tiny", "--probe", "mh"])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("PROBE "))
    probe = json.loads(line.removeprefix("PROBE "))
    assert probe["name"] == "mh" and probe["rss_growth_mib"] >= 0


def test_peak_tensor_memory_counts_what_is_live_at_once():
    def two_then_one():
        a = torch.ones(1024, 1024)  # 4 MiB each
        b = a * 2
        del a
        c = b + 1  # b and c live: 8 MiB, never 12
        return float(c[0, 0])

    assert common.peak_tensor_mib(two_then_one) == pytest.approx(8.0, abs=0.1)


def test_overhead_tiny_with_memory_reports_tensor_peaks_and_rss():
    section = overhead.main(["--tiny", "--memory", "--memory-reps", "1"])
    rows = {row[0]: row for row in table_rows(section)}
    for name in overhead.CONTENDERS.values():
        assert float(rows[name][6]) > 0 and float(rows[name][8]) >= 0  # tensor peak, RSS growth
    assert rows[overhead.CONTENDERS["hand"]][7] == "1"


def test_real_data_tiny_times_the_cache_and_appends_to_the_output(faces, tmp_path):
    output = tmp_path / "BENCH.md"
    section = real_data.main(["--tiny", "--data", str(faces), "--write", "--output", str(output)])
    rows = table_rows(section)
    cache = next(row for row in rows if row[0] == "12")  # 12 images decoded, none unreadable
    assert cache[1] == "0" and float(cache[3]) > 0
    throughput = [row for row in rows if row[0].startswith(("hand-written", "mh.fit"))]
    assert len(throughput) == 3 and all(float(row[1]) > 0 for row in throughput)
    text = output.read_text()
    assert text.startswith("# Benchmarks") and section in text


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inside Keras's torch backend (numpy 2 copy=)
def test_keras_peer_tiny_compares_speed_and_validation_metrics(faces):
    import keras_peer  # sets KERAS_BACKEND=torch before keras is imported

    pytest.importorskip("keras")

    section = keras_peer.main(["--tiny", "--data", str(faces), "--limit", "10", "--batch", "4"])
    rows = [row for row in table_rows(section) if row[0].startswith(("Keras", "manyheads"))]
    assert len(rows) == 2 and rows[1][4] == "1"
    for row in rows:
        assert float(row[1]) > 0 and 0 <= float(row[6]) <= 1 and 0 <= float(row[7]) <= 1


def test_inference_tiny_measures_each_batch_size():
    section = inference.main(["--tiny", "--batches", "1,2"])
    rows = [row for row in table_rows(section) if row[0] == "mobilenet_v2"]
    assert [row[1] for row in rows] == ["1", "2"]
    assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in rows)


def test_emit_writes_the_title_once_and_appends_sections(tmp_path, capsys):
    output = tmp_path / "B.md"
    common.emit("## one\n", True, output)
    common.emit("## two\n", True, output)
    text = output.read_text()
    assert text.count("# Benchmarks") == 1 and text.index("## one") < text.index("## two")
    output.write_text(text + "- a hand-written note")  # no newline after it, let alone a blank line
    common.emit("## three\n", True, output)
    assert "- a hand-written note\n\n## three\n" in output.read_text()
    common.emit("## four\n", True, output)  # after a section that ends in its blank line: none added
    assert "## three\n\n## four\n" in output.read_text()
    assert common.table(["a", "b"], [[0.123456, float("nan")]]).splitlines()[-1] == "| 0.123 | n/a |"


def test_cpu_allocator_tiny_runs_each_setting_in_its_own_process(faces):
    import cpu_allocator

    section = cpu_allocator.main(["--tiny", "--data", str(faces)])
    rows = {row[0]: row for row in table_rows(section)}
    assert set(cpu_allocator.CONTENDERS.values()) <= set(rows)
    assert rows[cpu_allocator.CONTENDERS["system"]][3] == "1"  # the reference's ratio to itself
    kept = rows[cpu_allocator.CONTENDERS["kept"]]
    assert float(kept[1]) > 0 and float(kept[6]) > 0  # epoch seconds and a peak RSS were measured


def test_reference_loop_tiny_scores_the_flagship_test_rows(faces):
    import reference_loop

    section = reference_loop.main(["--tiny", "--data", str(faces), "--workers", "1"])
    rows = {row[0]: row for row in table_rows(section)}
    assert set(rows) >= {"plain", "flip TTA"}
    for name in ("plain", "flip TTA"):
        assert float(rows[name][1]) >= 0 and 0 <= float(rows[name][3].rstrip("%")) <= 100
    # the test rows are those manyheads train holds out: 15 % of the 12 generated faces, seed 0
    assert "10 training and 2 test images" in section


def test_reference_loop_holds_out_the_split_it_is_given(faces, monkeypatch):
    import reference_loop

    seeds, split_of = [], reference_loop.Split.of
    monkeypatch.setattr(
        reference_loop.Split, "of", staticmethod(lambda n, cfg: seeds.append(cfg.seed) or split_of(n, cfg))
    )
    section = reference_loop.main(["--tiny", "--data", str(faces), "--workers", "1", "--split-seed", "3"])
    assert seeds == [3]
    assert "test split of split seed 3" in section and "split.seed=3" in section


def test_stream_throughput_quick_compares_the_stream_with_the_cache_and_breaks_it_down(faces):
    pytest.importorskip("webdataset")
    import stream_throughput

    section = stream_throughput.main(["--quick", "--data", str(faces), "--shard-size", "4", "--batch", "4"])
    rows = {row[0]: row for row in table_rows(section)}
    assert float(rows["mh.fit from the uint8 cache (memory-mapped)"][2]) == 1
    stream = next(row for name, row in rows.items() if name.startswith("mh.fit from 3 shards"))
    assert float(stream[1]) > 0
    stages = [row for name, row in rows.items() if "alone" in name]
    assert len(stages) == 5 and all(float(row[1]) > 0 for row in stages)
    assert "Command: `python benchmarks/stream_throughput.py --quick" in section


def test_augment_speed_tiny_times_the_recipe_and_the_defaults_against_the_earlier_module():
    import augment_speed

    section = augment_speed.main(["--tiny"])
    rows = {row[0]: row for row in table_rows(section)[1:]}
    assert set(rows) == {"recipe (examples/utkface.yaml)", "defaults (Augment())"}
    for row in rows.values():
        assert float(row[2]) > 0 and 0 < float(row[5]) < 100
    if augment_speed.earlier_module(augment_speed.BEFORE) is not None:  # a git checkout with its history
        assert all(float(row[1]) > 0 and float(row[3]) > 0 for row in rows.values())
    assert augment_speed.earlier_module("no-such-revision") is None
    assert augment_speed.recipe_options()["erase"] > 0  # read from the committed recipe


def test_stream_memory_quick_reports_resident_memory_over_the_run():
    import stream_memory

    section = stream_memory.main(["--quick", "--steps", "20", "--samples", "10000", "--workers", "0"])
    row = next(row for row in table_rows(section) if row[0] == "training process")
    start, peak = float(row[1]), float(row[3])
    assert 0 < start <= peak and "20 steps of 32 (640 samples of a stream of 10000)" in section


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """A joint run of two heads and one run per head, of one tiny config through `manyheads train`."""
    import yaml

    from manyheads.cli import main

    root = tmp_path_factory.mktemp("compare-runs")
    folder = root / "faces"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(40):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{rng.integers(1, 90)}_{i % 2}_0_2017{i:06d}.jpg.chip.jpg")
    heads = {"age": {"kind": "regression", "loss": "mae"}, "gender": {"kind": "binary", "labels": ["male", "female"]}}
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"source": "utkface", "path": str(folder)}, "heads": heads,
        "model": {"backbone": "mobilenet_v3_small", "pretrained": False, "image_size": 32},
        "train": {"epochs": 2, "batch_size": 8, "augment": False}, "split": {"test": 0.25, "validation": 0.2},
    }))  # fmt: skip
    made = {}
    for name, subset in {"joint": heads, "age": {"age": heads["age"]}, "gender": {"gender": heads["gender"]}}.items():
        made[name] = root / name
        assert main(["train", str(config), "--out", str(made[name]), "--quiet", f"heads={json.dumps(subset)}"]) == 0
    return made


def test_compare_runs_puts_finished_runs_side_by_side_as_compare_does(finished_runs, tmp_path):
    import compare_runs

    runs = finished_runs
    section = compare_runs.main(["--joint", str(runs["joint"]), "--single", str(runs["age"]), "--single",
                                 str(runs["gender"]), "--out", str(tmp_path / "cmp")])  # fmt: skip
    table = compare_runs.pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    assert (tmp_path / "cmp" / "comparison.md").is_file() and (tmp_path / "cmp" / "comparison.png").is_file()
    report = {name: json.loads((runs[name] / "metrics.json").read_text())["heads"] for name in runs}
    mae = table[(table["head"] == "age") & (table["metric"] == "mae")].iloc[0]
    assert mae["joint"] == pytest.approx(report["joint"]["age"]["metrics"]["mae"])
    assert mae["single"] == pytest.approx(report["age"]["age"]["metrics"]["mae"])
    rmse = table[(table["head"] == "age") & (table["metric"] == "rmse")].iloc[0]
    assert rmse["joint"] != rmse["single"]  # tiny models: MAE may tie, RMSE does not
    assert rmse["difference"] == pytest.approx(rmse["single"] - rmse["joint"])  # lower is better: > 0 = joint wins
    accuracy = table[(table["head"] == "gender") & (table["metric"] == "accuracy")].iloc[0]
    assert accuracy["difference"] == pytest.approx(accuracy["joint"] - accuracy["single"])
    assert accuracy["singles_params"] > accuracy["joint_params"] > accuracy["single_params"]  # two trunks > one
    rows = {(row[0], row[1]): row for row in table_rows(section) if len(row) == 8 and row[0] in ("age", "gender")}
    assert set(rows) == {("age", "mae"), ("gender", "accuracy")}  # the primary metrics in the summary


def test_compare_runs_refuses_runs_that_differ_naming_the_folder(finished_runs, tmp_path):
    import compare_runs

    runs = finished_runs
    with pytest.raises(compare_runs.RunsDiffer, match=r"no single-head run of \['gender'\]"):
        compare_runs.main(["--joint", str(runs["joint"]), "--single", str(runs["age"])])
    with pytest.raises(compare_runs.RunsDiffer, match="a single-head run needs one of the joint run's heads"):
        compare_runs.main(["--joint", str(runs["age"]), "--single", str(runs["joint"])])
    other = tmp_path / "other"
    import shutil

    shutil.copytree(runs["gender"], other)
    config = other / "config.yaml"
    config.write_text(config.read_text().replace("epochs: 2", "epochs: 3"))
    with pytest.raises(compare_runs.RunsDiffer, match=f"{other}: config section 'train' differs"):
        compare_runs.main(["--joint", str(runs["joint"]), "--single", str(runs["age"]), "--single", str(other)])
    with pytest.raises(compare_runs.RunsDiffer, match=r"\['metrics.json'\] not found"):
        (other / "metrics.json").unlink()
        compare_runs.main(["--joint", str(runs["joint"]), "--single", str(other)])

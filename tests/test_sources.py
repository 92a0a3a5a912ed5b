"""Data sources: Hugging Face data sets, Parquet tables of image bytes, YAML sources, torch Datasets streamed
into the image cache. Everything is generated in tmp_path; nothing downloads."""

import io
import sys
import tracemalloc

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

import manyheads as mh
from manyheads import encoding, runs, sources
from manyheads.cli import main
from manyheads.config import ConfigError, load_config, parse_config
from manyheads.images import load_rgb

try:  # the [hf] and [parquet] extras; the torch Dataset tests need neither
    import datasets as hf
    import pyarrow  # noqa: F401
except ImportError:
    hf = None

GENDERS = ["male", "female"]
RACES = ["White", "Black", "Asian"]
N = 24


def heads() -> dict:
    return {"age": mh.Regression(), "gender": mh.Binary(GENDERS), "race": mh.Categorical(RACES)}


def tiny_net() -> mh.MultiHeadNet:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return mh.MultiHeadNet(trunk, heads(), image_size=32)


@pytest.fixture
def by_path(tmp_path):
    """N image files (PNG and JPEG, not square) and their labels, as a DataFrame of paths."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(N):
        path = tmp_path / f"face{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    gender, race = [i % 2 for i in range(N)], [i % 3 for i in range(N)]
    age = [None if i == 5 else float(20 + i) for i in range(N)]  # row 5: not labelled for age
    return pd.DataFrame({"image": paths, "age": age, "gender": [GENDERS[g] for g in gender],
                         "race": [RACES[r] for r in race]})  # fmt: skip


@pytest.fixture
def faces(by_path, tmp_path):
    """The same rows as paths, as a Hugging Face folder (and one of two splits), as Parquet image bytes."""
    if hf is None:
        pytest.skip('needs pip install "manyheads[hf,parquet]"')
    paths, age = by_path["image"].tolist(), [None if pd.isna(a) else a for a in by_path["age"]]
    gender = [GENDERS.index(g) for g in by_path["gender"]]
    race = [RACES.index(r) for r in by_path["race"]]
    features = hf.Features({"image": hf.Image(), "age": hf.Value("float64"),
                            "gender": hf.ClassLabel(names=GENDERS), "race": hf.ClassLabel(names=RACES)})  # fmt: skip
    dataset = hf.Dataset.from_dict({"image": paths, "age": age, "gender": gender, "race": race}, features=features)
    dataset.save_to_disk(tmp_path / "hf")
    hf.DatasetDict({"train": dataset, "test": dataset.select(range(4))}).save_to_disk(tmp_path / "hf_splits")
    by_bytes = by_path.assign(image=[open(p, "rb").read() for p in paths])
    by_bytes.to_parquet(tmp_path / "faces.parquet")
    return {"paths": by_path, "hf": tmp_path / "hf", "splits": tmp_path / "hf_splits",
            "parquet": tmp_path / "faces.parquet", "root": tmp_path}  # fmt: skip


def prepared(data, **options):
    return encoding.prepare(data, None, heads(), image_size=32, workers=1, **options).train


def assert_same(got: encoding.Encoded, expected: encoding.Encoded) -> None:
    assert got.images and torch.equal(got.inputs, expected.inputs)  # identical cached image tensors
    for name in expected.targets:
        assert torch.equal(got.targets[name], expected.targets[name]), name
        assert torch.equal(got.labelled[name], expected.labelled[name]), name


def trains(result: mh.TrainResult) -> None:
    assert len(result.history) == 1 and np.isfinite(result.history["train/total/loss"]).all()


def test_a_hugging_face_dataset_encodes_as_its_image_paths_and_trains(faces, tmp_path):
    expected = prepared(faces["paths"])
    dataset = hf.load_from_disk(str(faces["hf"]))
    table = mh.datasets.from_hf(faces["hf"])
    assert table["gender"].tolist()[:2] == GENDERS and table["race"].tolist()[:3] == RACES  # ClassLabel -> names
    assert_same(prepared(dataset), expected)
    assert_same(prepared(table), expected)
    assert_same(prepared(dataset, cache_dir=tmp_path / "cache"), expected)  # bytes through the on-disk cache
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    trains(mh.fit(tiny_net(), dataset, epochs=1, batch_size=8, progress=False))


def test_a_parquet_table_of_image_bytes_encodes_as_its_image_paths_and_trains(faces, tmp_path):
    table = mh.datasets.from_parquet(faces["parquet"])
    assert isinstance(table["image"][0], bytes)
    assert_same(prepared(table), prepared(faces["paths"]))
    assert_same(prepared(table, cache_dir=tmp_path / "cache"), prepared(faces["paths"]))
    trains(mh.fit(tiny_net(), table, epochs=1, batch_size=8, progress=False))


def test_parquet_paths_are_read_relative_to_the_file_and_hf_class_labels_kept(faces, tmp_path):
    relative = faces["paths"].assign(image=[p.rsplit("/", 1)[1] for p in faces["paths"]["image"]])
    relative.rename(columns={"image": "file"}).to_parquet(tmp_path / "paths.parquet")
    table = mh.datasets.from_parquet(tmp_path / "paths.parquet", image_column="file")
    assert table["image"].tolist() == faces["paths"]["image"].tolist()
    hf.load_from_disk(str(faces["hf"])).to_parquet(tmp_path / "from_hf.parquet")
    written = mh.datasets.from_parquet(tmp_path / "from_hf.parquet")  # ClassLabel names from the file's metadata
    assert written["gender"].tolist() == faces["paths"]["gender"].tolist()
    assert_same(prepared(written), prepared(faces["paths"]))


def test_a_missing_split_is_refused_naming_the_splits(faces):
    with pytest.raises(ValueError, match=r"no split 'validation'; the splits are \['train', 'test'\]"):
        mh.datasets.from_hf(faces["splits"], split="validation")
    with pytest.raises(ValueError, match=r"the splits \['train', 'test'\]; pick one with split="):
        mh.datasets.from_hf(faces["splits"])
    splits = hf.load_from_disk(str(faces["splits"]))
    with pytest.raises(ValueError, match=r"the splits \['train', 'test'\].*dataset\['train'\]"):
        mh.fit(tiny_net(), splits, epochs=1, progress=False)
    assert len(mh.datasets.from_hf(splits, split="test")) == 4


def test_a_missing_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: import fails
    with pytest.raises(ImportError, match=r'pip install "manyheads\[hf\]"'):
        mh.datasets.from_hf(tmp_path)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match=r'pip install "manyheads\[parquet\]"'):
        mh.datasets.from_parquet(tmp_path / "faces.parquet")


@pytest.mark.parametrize("source", ["hf", "parquet"])
def test_yaml_sources_load_and_train(faces, tmp_path, source):
    data = {"source": "hf", "path": str(faces["splits"]), "split": "train"} if source == "hf" else {
        "source": "parquet", "path": str(faces["parquet"])}  # fmt: skip
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "data": data, "heads": {"age": {"kind": "regression"}, "gender": {"kind": "binary", "labels": GENDERS},
                                "race": {"kind": "categorical", "labels": RACES}},
        "model": {"image_size": 32}, "train": {"epochs": 1, "batch_size": 8, "augment": False},
    }))  # fmt: skip
    cfg = load_config(config)
    table = runs.load_table(cfg)  # what `manyheads train` reads
    assert_same(prepared(table), prepared(faces["paths"]))
    trains(mh.fit(tiny_net(), table, epochs=1, batch_size=8, inputs=cfg.data.inputs, progress=False))


def test_manyheads_train_runs_on_an_hf_folder(faces, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"source": "hf", "path": str(faces["splits"]), "split": "train"},
        "heads": {"gender": {"kind": "binary", "labels": GENDERS}, "race": {"kind": "categorical", "labels": RACES}},
        "model": {"backbone": "resnet18", "image_size": 32}, "train": {"epochs": 1, "batch_size": 8, "augment": False},
        "split": {"test": 0, "validation": 0},  # no test report: seconds
    }))  # fmt: skip
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "model.safetensors").is_file() and len(pd.read_csv(tmp_path / "run/history.csv")) == 1


def test_the_config_lists_the_registered_sources():
    assert list(sources.REGISTRY)[-3:] == ["hf", "parquet", "shapes"]
    with pytest.raises(ConfigError, match=r"data.source: must be one of \[.*'hf', 'parquet', 'shapes'\]; got 'tsv'"):
        parse_config({"data": {"source": "tsv", "path": "x"}, "heads": {"a": {"kind": "binary"}}})
    with pytest.raises(ConfigError, match="the parquet source needs data.path"):
        parse_config({"data": {"source": "parquet"}, "heads": {"a": {"kind": "binary"}}})
    with pytest.raises(FileNotFoundError, match=r"nope.parquet \(data.path of the parquet source"):
        runs.load_table(parse_config({"data": {"source": "parquet", "path": "nope.parquet"},
                                      "heads": {"a": {"kind": "binary"}}}))  # fmt: skip


# ---- torch Datasets: image values of every kind, streamed into the cache -----------------------------------


class Rows(torch.utils.data.Dataset):
    """The faces as a torch Dataset of dicts whose image is a path, PIL image, array, tensor, bytes or HF dict."""

    def __init__(self, table: pd.DataFrame, kind: str) -> None:
        self.table, self.kind = table, kind

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict:
        row = self.table.iloc[i].to_dict()
        path = row["image"]
        with Image.open(path) as img:
            pixels = np.array(img.convert("RGB"))
        row["image"] = {
            "path": path,
            "pil": Image.open(path),
            "array": pixels,
            "tensor": torch.from_numpy(pixels).permute(2, 0, 1).contiguous(),
            "bytes": open(path, "rb").read(),
            "hf": {"bytes": open(path, "rb").read(), "path": path},
        }[self.kind]
        return row


@pytest.mark.parametrize("kind", ["path", "pil", "array", "tensor", "bytes", "hf"])
def test_a_torch_dataset_of_any_image_value_encodes_as_its_paths(by_path, kind):
    png = by_path[by_path["image"].str.endswith(".png")].reset_index(drop=True)  # lossless: equal
    rows = Rows(png, kind)
    table = encoding.columns_of(rows)
    assert isinstance(table["image"], encoding.DatasetColumn) == (kind != "path")  # paths are small: read
    assert_same(prepared(rows), prepared(png))


def test_fit_trains_on_a_torch_dataset_of_pil_images(by_path):
    trains(mh.fit(tiny_net(), Rows(by_path, "pil"), validation=0.25, epochs=1, batch_size=8, progress=False))


class Generated(torch.utils.data.Dataset):
    """Images made on the fly: nothing of the set is in memory until asked for."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        image = np.random.default_rng(i).integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)
        return {"image": image, "label": GENDERS[i % 2]}


def test_a_torch_dataset_streams_into_the_cache_with_bounded_memory(tmp_path):
    rows, size = Generated(2000, 64), 64
    decoded = len(rows) * 3 * size * size  # 24.6 MB of uint8 pixels, as big again as the generated arrays
    tracemalloc.start()
    try:
        data = encoding.prepare(rows, 0.2, {"label": mh.Binary(GENDERS)}, image_size=size, cache_dir=tmp_path,
                                workers=1)  # fmt: skip
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < decoded / 8, f"peak {peak / 1e6:.1f} MB while caching {decoded / 1e6:.1f} MB of images"
    files = sorted(tmp_path.glob("*.npy"))
    assert len(files) == 2 and sum(f.stat().st_size for f in files) >= decoded  # train and validation caches
    assert len(data.train) == 1600 and len(data.validation) == 400
    kept, held = encoding.split_rows(len(rows), 0.2, seed=0)
    for position in (0, 777, 1599):
        assert torch.equal(data.train.inputs[position], load_rgb(rows[int(kept[position])]["image"], size))
    assert torch.equal(data.validation.inputs[-1], load_rgb(rows[int(held[-1])]["image"], size))
    assert data.train.targets["label"].sum() == sum(int(i) % 2 for i in kept)


def test_bytes_in_a_dataframe_are_bad_rows_when_they_are_not_images(faces):
    table = mh.datasets.from_parquet(faces["parquet"])
    table.loc[3, "image"] = b"not an image"
    with pytest.raises(ValueError, match="item 3: not an image"):
        prepared(table)
    data = encoding.prepare(table, None, heads(), image_size=32, on_bad="skip", warn=False)
    assert [(b.row, b.reason) for b in data.bad] == [(3, "not an image")] and len(data.train) == N - 1


def test_image_bytes_of_a_jpeg_decode_as_the_file_does(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 200, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (tmp_path / "a.jpg").write_bytes(buffer.getvalue())
    assert torch.equal(load_rgb(buffer.getvalue(), 64), load_rgb(tmp_path / "a.jpg", 64))  # the same draft decode

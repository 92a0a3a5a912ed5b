"""Tests for manyheads.datasets (run with PYTHONPATH=src)."""

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import manyheads as mh
from manyheads.datasets import (
    FAIRFACE_AGES,
    FAIRFACE_RACES,
    SHAPES,
    UTKFACE_GENDERS,
    UTKFACE_RACES,
    fairface,
    from_csv,
    shapes,
    utkface,
)

REAL_UTKFACE = Path(__file__).parents[1].parent / "shared/data/utkface"


def touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).write_bytes(b"")


# ---------------------------------------------------------------- UTKFace


def test_utkface_parses_valid_and_skips_malformed(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "25_1_2_20170116.jpg")  # a real tiny JPEG
    touch(
        tmp_path,
        "3_0_4_20170101.jpg.chip.jpg",
        "116_0_0_20170102.png",
        "40_1_20170103.jpg",  # missing field
        "30_2_0_20170104.jpg",  # bad gender
        "30_0_5_20170105.jpg",  # bad race
        "xx_0_0_20170106.jpg",  # non-integer age
        "121_0_0_20170107.jpg",  # age out of range
        "README.md",
        "notes.txt",
    )
    with pytest.warns(UserWarning, match=r"skipped 5 malformed") as record:
        df = utkface(tmp_path)
    assert len(record) == 1
    assert list(df.columns) == ["image", "age", "gender", "race"]
    assert df["age"].dtype == np.int64
    assert df.to_dict("records") == [
        {
            "image": str(tmp_path.resolve() / "116_0_0_20170102.png"),
            "age": 116,
            "gender": "male",
            "race": "White",
        },
        {
            "image": str(tmp_path.resolve() / "25_1_2_20170116.jpg"),
            "age": 25,
            "gender": "female",
            "race": "Asian",
        },
        {
            "image": str(tmp_path.resolve() / "3_0_4_20170101.jpg.chip.jpg"),
            "age": 3,
            "gender": "male",
            "race": "Others",
        },
    ]
    skipped = {s["file"]: s["reason"] for s in df.attrs["skipped"]}
    assert set(skipped) == {
        "40_1_20170103.jpg",
        "30_2_0_20170104.jpg",
        "30_0_5_20170105.jpg",
        "xx_0_0_20170106.jpg",
        "121_0_0_20170107.jpg",
    }
    assert "missing field" in skipped["40_1_20170103.jpg"]
    assert "gender" in skipped["30_2_0_20170104.jpg"]
    assert "race" in skipped["30_0_5_20170105.jpg"]
    assert "age 'xx'" in skipped["xx_0_0_20170106.jpg"]
    assert "0..120" in skipped["121_0_0_20170107.jpg"]


def test_utkface_clean_folder_does_not_warn(tmp_path, recwarn):
    touch(tmp_path, "1_0_0_a.jpg", "2_1_1_b.jpg", "README.md")
    df = utkface(tmp_path)
    assert len(recwarn) == 0
    assert df.attrs["skipped"] == []
    assert df["race"].tolist() == ["White", "Black"]


def test_utkface_limit_is_evenly_spaced(tmp_path):
    touch(tmp_path, *(f"{age}_0_0_x.jpg" for age in range(10, 30)))  # sorted: ages 10..29
    df = utkface(tmp_path, limit=5)
    assert df["age"].tolist() == [10, 15, 20, 24, 29]
    assert df.index.tolist() == list(range(5))
    assert len(utkface(tmp_path, limit=100)) == 20
    with pytest.raises(ValueError, match="limit"):
        utkface(tmp_path, limit=0)


def test_utkface_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        utkface(tmp_path / "nowhere")


def test_utkface_no_valid_image(tmp_path):
    touch(tmp_path, "README.md", "bad.jpg")
    with pytest.raises(ValueError, match=str(tmp_path.resolve())):
        utkface(tmp_path)


@pytest.mark.skipif(not REAL_UTKFACE.is_dir(), reason=f"real UTKFace not found at {REAL_UTKFACE}")
def test_utkface_real_folder():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = utkface(REAL_UTKFACE)
    assert 19_000 < len(df) <= 20_199
    assert df["age"].between(1, 116).all()
    assert set(df["gender"]) == set(UTKFACE_GENDERS)
    assert set(df["race"]) == set(UTKFACE_RACES)
    assert df["image"].is_unique and df["image"].map(lambda p: Path(p).is_absolute()).all()
    skipped = df.attrs["skipped"]
    assert len(df) + len(skipped) == len(list(REAL_UTKFACE.glob("*.jpg")))
    assert all(s["file"] and s["reason"] for s in skipped)
    messages = [str(w.message) for w in caught]
    if skipped:
        assert len(messages) == 1 and messages[0].startswith(f"skipped {len(skipped)} malformed")
    else:
        assert messages == []


# ---------------------------------------------------------------- FairFace

FAIRFACE_CSV = """file,age,gender,race,service_test
train/1.jpg,50-59,Male,East Asian,True
train/2.jpg,more than 70,Female,Latino_Hispanic,False
train/3.jpg,3-9,Femal,White,True
train/4.jpg,,Male,White,False
train/5.jpg,0-2,Male,Martian,False
train/6.jpg,20-29,Female,Middle Eastern,False
"""


def test_fairface_parses_and_skips_bad_rows(tmp_path):
    csv = tmp_path / "fairface_label_train.csv"
    csv.write_text(FAIRFACE_CSV)
    with pytest.warns(UserWarning, match="skipped 3 malformed FairFace rows"):
        df = fairface(csv, tmp_path / "images")
    assert list(df.columns) == ["image", "age", "gender", "race", "service_test"]
    assert df["image"].tolist() == [str(tmp_path.resolve() / "images/train" / f"{i}.jpg") for i in (1, 2, 6)]
    assert df["age"].tolist() == ["50-59", "more than 70", "20-29"]
    assert set(df["age"]) <= set(FAIRFACE_AGES)
    assert df["gender"].tolist() == ["Male", "Female", "Female"]
    assert df["race"].tolist() == ["East Asian", "Latino_Hispanic", "Middle Eastern"]
    assert set(df["race"]) <= set(FAIRFACE_RACES)
    assert df["service_test"].dtype == bool
    assert df["service_test"].tolist() == [True, False, False]
    skipped = df.attrs["skipped"]
    assert [(s["line"], s["file"]) for s in skipped] == [
        (4, "train/3.jpg"),
        (5, "train/4.jpg"),
        (6, "train/5.jpg"),
    ]
    assert "gender 'Femal'" in skipped[0]["reason"]
    assert "age ''" in skipped[1]["reason"]
    assert "race 'Martian'" in skipped[2]["reason"]


def test_fairface_missing_column(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("file,age,race\ntrain/1.jpg,0-2,White\n")
    with pytest.raises(ValueError, match=r"labels\.csv.*\['gender'\].*found \['file', 'age', 'race'\]"):
        fairface(csv, tmp_path)


# ---------------------------------------------------------------- from_csv


def test_from_csv_resolves_paths_and_keeps_missing(tmp_path):
    (tmp_path / "labels").mkdir()
    csv = tmp_path / "labels" / "table.csv"
    csv.write_text("path,age,smiling,note\na/1.jpg,31,yes,NA\n/abs/2.png,,no,x\n../b/3.jpg,7,,\n")
    df = from_csv(csv, image_column="path")
    assert list(df.columns) == ["image", "age", "smiling", "note"]
    here = tmp_path.resolve()
    assert df["image"].tolist() == [
        str(here / "labels/a/1.jpg"),
        "/abs/2.png",
        str(here / "b/3.jpg"),
    ]
    assert df["age"].isna().tolist() == [False, True, False]
    assert df.loc[0, "age"] == 31
    assert df["smiling"].isna().tolist() == [False, False, True]
    assert df.loc[0, "note"] == "NA"  # only empty cells are missing
    assert pd.isna(df.loc[2, "note"])


def test_from_csv_image_root_and_errors(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("image,label\n001.jpg,cat\n")
    df = from_csv(csv, tmp_path / "imgs")
    assert df["image"].tolist() == [str(tmp_path.resolve() / "imgs/001.jpg")]
    with pytest.raises(ValueError, match=r"t\.csv.*'file'.*\['image', 'label'\]"):
        from_csv(csv, image_column="file")
    csv.write_text("image,label\n,cat\n")
    with pytest.raises(ValueError, match="no image"):
        from_csv(csv)


def test_from_csv_reads_a_numeric_column_with_text_cells_per_cell(tmp_path):
    csv = tmp_path / "t.csv"
    rows = ["image,age,score,grade,note"] + [f"{i}.jpg,{20 + i},{i / 4},{'ABC'[i % 3]},x" for i in range(9)]
    rows[3] = "2.jpg,abc,n/a,1,x"  # one text cell in each numeric column; a number in a text column
    rows[5] = "4.jpg,,0.5,B,"
    csv.write_text("\n".join(rows) + "\n")
    df = from_csv(csv)
    assert df["age"].tolist()[:3] == [20, 21, "abc"] and all(type(v) is int for v in df["age"][[0, 1, 3]])
    assert pd.isna(df.loc[4, "age"]) and df.loc[8, "age"] == 28
    assert df.loc[2, "score"] == "n/a" and df.loc[1, "score"] == 0.25 and isinstance(df.loc[0, "score"], float)
    assert df["grade"].tolist()[:3] == ["A", "B", "1"]  # mostly text: labels, kept as text
    assert df.loc[0, "note"] == "x" and pd.isna(df.loc[4, "note"])
    bad = {}
    _, labelled = mh.Regression().encode(df["age"], name="age", bad=bad)
    assert list(bad) == [2] and "got 'abc'" in bad[2].message and labelled.sum() == 7  # row 4: unlabelled, not bad


# ---------------------------------------------------------------- shapes


def test_shapes_format_and_determinism():
    df = shapes(60, size=32, seed=3)
    assert list(df.columns) == ["image", "size", "filled", "shape"]
    image = df["image"][0]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    again, other = shapes(60, size=32, seed=3), shapes(60, size=32, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(df["image"], again["image"]))
    assert df.drop(columns="image").equals(again.drop(columns="image"))
    assert not df["size"].equals(other["size"])
    assert df["size"].between(0.15 * 32, 0.45 * 32).all()


def test_shapes_labels_balanced():
    df = shapes(300)
    assert df["shape"].value_counts().to_dict() == {s: 100 for s in SHAPES}
    assert df["filled"].sum() == 150
    # fill is not tied to shape: each shape has both filled and hollow examples
    assert df.groupby("shape")["filled"].mean().between(0.3, 0.7).all()


def test_shapes_pixels_match_labels():
    df = shapes(300, size=64, seed=1)
    lit = np.array([(img.max(axis=2) > 100).sum() for img in df["image"]])
    filled = df["filled"].to_numpy()
    for shape in SHAPES:
        mask = filled & (df["shape"] == shape).to_numpy()
        assert np.corrcoef(df["size"][mask], lit[mask])[0, 1] > 0.95
    # hollow outlines light fewer pixels than filled shapes of similar size
    big = df["size"].to_numpy() > 0.3 * 64
    assert lit[big & filled].mean() > 2 * lit[big & ~filled].mean()
    # a circle lights about pi r^2 pixels
    circles = filled & (df["shape"] == "circle").to_numpy()
    ratio = lit[circles] / (np.pi * df["size"][circles] ** 2)
    assert ratio.between(0.9, 1.1).all()


def test_shapes_rejects_bad_arguments():
    with pytest.raises(ValueError, match="size >= 16"):
        shapes(10, size=8)

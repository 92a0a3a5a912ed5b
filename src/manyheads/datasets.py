"""Ready-made data sets: label tables for UTKFace, FairFace, any CSV or Parquet table, Hugging Face
data sets, and generated shapes.

Every loader returns a pandas DataFrame with an ``image`` column (an absolute path
string, or for :func:`shapes` an RGB uint8 array; for :func:`from_parquet` and :func:`from_hf`
possibly the image files' bytes, decoded later through the same image cache as paths) and one
column per label. Rows that cannot be parsed are skipped with one warning and listed in
``df.attrs["skipped"]``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

UTKFACE_GENDERS = ["male", "female"]
UTKFACE_RACES = ["White", "Black", "Asian", "Indian", "Others"]
FAIRFACE_AGES = [
    "0-2",
    "3-9",
    "10-19",
    "20-29",
    "30-39",
    "40-49",
    "50-59",
    "60-69",
    "more than 70",
]
FAIRFACE_GENDERS = ["Male", "Female"]
FAIRFACE_RACES = [
    "White",
    "Black",
    "Latino_Hispanic",
    "East Asian",
    "Southeast Asian",
    "Indian",
    "Middle Eastern",
]
SHAPES = ["circle", "square", "triangle"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
_INT = re.compile(r"[0-9]+")


def _warn_skipped(skipped: list[dict], what: str) -> None:
    """Issue one warning that counts the skipped entries and shows up to three."""
    if skipped:
        examples = "; ".join(f"{s.get('file', '')!r}: {s['reason']}" for s in skipped[:3])
        warnings.warn(
            f"skipped {len(skipped)} malformed {what} (see df.attrs['skipped']), e.g. {examples}",
            stacklevel=3,
        )


def _parse_utkface_name(name: str) -> tuple[int, str, str] | str:
    """Return (age, gender, race) for a UTKFace file name, or the reason it is malformed."""
    parts = name.split(".")[0].split("_", 3)
    if len(parts) < 4:
        return f"missing field: {len(parts)} of 4 in age_gender_race_datetime"
    age, gender, race = parts[:3]
    for field, value in (("age", age), ("gender", gender), ("race", race)):
        if not _INT.fullmatch(value):
            return f"{field} {value!r} is not a non-negative integer"
    if not 0 <= int(age) <= 120:
        return f"age {age} is outside 0..120"
    if int(gender) >= len(UTKFACE_GENDERS):
        return f"gender {gender} is not 0 (male) or 1 (female)"
    if int(race) >= len(UTKFACE_RACES):
        return f"race {race} is not in 0..4"
    return int(age), UTKFACE_GENDERS[int(gender)], UTKFACE_RACES[int(race)]


def utkface(folder: str | os.PathLike, *, limit: int | None = None) -> pd.DataFrame:
    """Read UTKFace labels from the image file names in ``folder``.

    File names are ``{age}_{gender}_{race}_{datetime}.jpg`` (or ``.jpg.chip.jpg``
    for the aligned-and-cropped release). Returns columns ``image`` (absolute path),
    ``age`` (int64), ``gender`` (from UTKFACE_GENDERS) and ``race`` (from
    UTKFACE_RACES), sorted by file name. Only *.jpg, *.jpeg and *.png files are
    considered; subfolders are not searched. Malformed names are skipped with one
    warning and listed in ``df.attrs["skipped"]`` as ``{"file", "reason"}`` dicts.
    ``limit`` keeps ``limit`` evenly spaced rows of the sorted table, so a small
    subset is deterministic and still spans all ages. Images are not opened.

    Example: ``df = utkface("data/utkface", limit=1000)``
    """
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"UTKFace folder not found: {root}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit}")
    names = sorted(p.name for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    rows, skipped = [], []
    for name in names:
        parsed = _parse_utkface_name(name)
        if isinstance(parsed, str):
            skipped.append({"file": name, "reason": parsed})
        else:
            rows.append((str(root / name), *parsed))
    if not rows:
        raise ValueError(
            f"no valid UTKFace image in {root} ({len(names)} image files, {len(skipped)} "
            "malformed; subfolders are not searched)"
        )
    _warn_skipped(skipped, "UTKFace file names")
    df = pd.DataFrame(rows, columns=["image", "age", "gender", "race"]).astype({"age": "int64"})
    if limit is not None and limit < len(df):
        picks = np.linspace(0, len(df) - 1, limit).round().astype(int)
        df = df.iloc[picks].reset_index(drop=True)
    df.attrs["skipped"] = skipped
    return df


def fairface(label_csv: str | os.PathLike, image_root: str | os.PathLike) -> pd.DataFrame:
    """Read a FairFace label CSV (``file, age, gender, race[, service_test]``).

    Returns columns ``image`` (absolute path ``image_root / file``), ``age``,
    ``gender`` and ``race`` as label strings (from FAIRFACE_AGES, FAIRFACE_GENDERS,
    FAIRFACE_RACES; ages are in order, ready for an ordinal head) and, when the CSV
    has it, ``service_test`` as bool. Rows with an unknown value are skipped with
    one warning and listed in ``df.attrs["skipped"]`` as ``{"line", "file", "reason"}``
    dicts, where ``line`` is the CSV line number (the header is line 1).

    Example: ``df = fairface("fairface_label_train.csv", "data/fairface")``
    """
    table = pd.read_csv(label_csv, dtype=str, keep_default_na=False)
    required = ["file", "age", "gender", "race"]
    if missing := [c for c in required if c not in table.columns]:
        raise ValueError(
            f"{label_csv}: missing column(s) {missing}; expected {required} (+ optional 'service_test'), "
            f"found {list(table.columns)}"
        )
    table = table.apply(lambda col: col.str.strip())
    allowed = {"age": FAIRFACE_AGES, "gender": FAIRFACE_GENDERS, "race": FAIRFACE_RACES}
    flags = {"true": True, "1": True, "false": False, "0": False}
    root = Path(image_root).expanduser().resolve()
    has_service = "service_test" in table.columns
    rows, skipped = [], []
    for i, rec in enumerate(table.to_dict("records")):
        reasons = [
            f"{col} {rec[col]!r} is not one of {labels}" for col, labels in allowed.items() if rec[col] not in labels
        ]
        if not rec["file"]:
            reasons.append("file is empty")
        if has_service and rec["service_test"].lower() not in flags:
            reasons.append(f"service_test {rec['service_test']!r} is not True/False")
        if reasons:
            skipped.append({"line": i + 2, "file": rec["file"], "reason": "; ".join(reasons)})
            continue
        row = {"image": os.path.abspath(root / rec["file"])} | {c: rec[c] for c in allowed}
        if has_service:
            row["service_test"] = flags[rec["service_test"].lower()]
        rows.append(row)
    if not rows:
        raise ValueError(f"{label_csv}: no valid FairFace row ({len(skipped)} skipped)")
    _warn_skipped(skipped, "FairFace rows")
    df = pd.DataFrame(rows)
    df.attrs["skipped"] = skipped
    return df


def from_csv(
    csv: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    image_column: str = "image",
) -> pd.DataFrame:
    """Read any label table (CSV) whose ``image_column`` names image files.

    Image paths are made absolute, relative to ``image_root`` (default: the CSV's
    folder), and stored in a column named ``image``. Only empty cells become
    missing (NaN), meaning 'not labelled for this head'; text such as ``NA`` is
    kept as is. A column of numbers with some text cells among them (more than half
    of its non-empty cells numbers) is read cell by cell: the numbers become numbers
    and the text cells stay text, so a regression head names each bad row and its
    value (and ``on_bad="skip"`` drops only those rows), where pandas would make the
    whole column text. Files are not checked here: the image loader reports bad ones.

    Example: ``df = from_csv("labels.csv", "photos/", image_column="path")``
    """
    csv = Path(csv)
    table = pd.read_csv(csv, dtype={image_column: str}, keep_default_na=False, na_values=[""])
    if image_column not in table.columns:
        raise ValueError(f"{csv}: no image column {image_column!r}; columns are {list(table.columns)}")
    if image_column != "image" and "image" in table.columns:
        raise ValueError(f"{csv}: has both {image_column!r} and 'image' columns; rename one")
    empty = table.index[table[image_column].isna()]
    if len(empty):
        lines = ", ".join(str(i + 2) for i in empty[:10])
        raise ValueError(f"{csv}: {len(empty)} row(s) have no image (CSV lines {lines})")
    root = Path(image_root) if image_root is not None else csv.parent
    root = root.expanduser().resolve()
    table[image_column] = [os.path.abspath(root / p) for p in table[image_column]]
    for column in table.columns.drop(image_column):
        table[column] = _numbers_per_cell(table[column])
    return table.rename(columns={image_column: "image"})


def _require(module: str, extra: str, what: str) -> Any:
    """Import an optional package, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f'{what} needs the {module} package: pip install "manyheads[{extra}]"') from None


def _absolute_paths(values: pd.Series, root: Path) -> list[Any]:
    """Path strings made absolute, relative to ``root``; bytes, image dicts and missing values as they are."""
    return [os.path.abspath(root / v) if isinstance(v, str) else v for v in values]


def from_parquet(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    image_column: str = "image",
) -> pd.DataFrame:
    """Read a Parquet table whose ``image_column`` holds image files' bytes or paths (through pyarrow).

    Bytes (and Hugging Face ``{"bytes", "path"}`` values) are kept and decoded later through the
    same image cache as paths; path strings are made absolute, relative to ``image_root``
    (default: the file's folder). The image column is renamed ``image``. A file written by a
    Hugging Face data set (``Dataset.to_parquet``) keeps its ``ClassLabel`` names in its metadata:
    those columns hold the label names, as :func:`from_hf` gives them.

    Example: ``df = from_parquet("faces.parquet")``
    """
    _require("pyarrow", "parquet", "reading Parquet")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Parquet file not found: {path}")
    table = pd.read_parquet(path)
    if image_column not in table.columns:
        raise ValueError(f"{path}: no image column {image_column!r}; columns are {list(table.columns)}")
    if image_column != "image" and "image" in table.columns:
        raise ValueError(f"{path}: has both {image_column!r} and 'image' columns; rename one")
    root = (Path(image_root) if image_root is not None else path.parent).expanduser().resolve()
    table[image_column] = _absolute_paths(table[image_column], root)
    for column, names in _parquet_class_labels(path).items():
        if column in table.columns:
            table[column] = _label_names(table[column], names)
    return table.rename(columns={image_column: "image"})


def _parquet_class_labels(path: Path) -> dict[str, list[str]]:
    """Column -> label names of the ``ClassLabel`` features a Hugging Face data set wrote into the file."""
    import pyarrow.parquet as pq

    metadata = pq.read_schema(path).metadata or {}
    try:
        features = json.loads(metadata.get(b"huggingface", b"{}")).get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        return {}
    return {
        name: feature["names"]
        for name, feature in features.items()
        if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and "names" in feature
    }


def _label_names(values: Any, names: list[str]) -> list[Any]:
    """Class indices as their names; -1 (Hugging Face's "no label"), missing or other values as None."""

    def name(v: Any) -> Any:
        return names[int(v)] if isinstance(v, int | np.integer) and 0 <= v < len(names) else None

    return [name(v) for v in values]


def from_hf(data: Any, split: str | None = None) -> pd.DataFrame:
    """Read a Hugging Face data set: a ``datasets.Dataset``, a ``DatasetDict`` (pick ``split``), or a
    folder written by ``save_to_disk``.

    Columns keep their names (``data.inputs`` / ``inputs=`` picks the image column). Image features
    stay encoded (``{"bytes", "path"}`` values) and are decoded later through the same image cache
    as paths. ``ClassLabel`` features become their label names (``-1``, no label, becomes None),
    lists of them lists of names, ready for classifier heads. ``split`` picks a DatasetDict's split
    (needed when it has more than one; a missing one is refused, naming those there); a single
    Dataset is taken as it is unless it records another split. Needs ``pip install "manyheads[hf]"``.

    Example: ``df = from_hf("data/faces_hf", split="train")``
    """
    hf = _require("datasets", "hf", "reading a Hugging Face data set")
    where = str(data) if isinstance(data, str | os.PathLike) else f"the {type(data).__name__}"
    if isinstance(data, str | os.PathLike):
        folder = Path(data).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"Hugging Face data set folder not found: {folder} (written by save_to_disk)")
        data = hf.load_from_disk(str(folder))
    if isinstance(data, hf.IterableDataset | hf.IterableDatasetDict):
        raise ValueError(f"{where}: a streaming (Iterable) data set cannot be read here; load it without "
                         "streaming=True, or wrap it in a torch Dataset of dicts")  # fmt: skip
    if isinstance(data, hf.DatasetDict):
        data = _hf_split(data, split, where)
    elif split is not None and data.split is not None and str(data.split) != split:
        raise ValueError(f"{where}: split={split!r}, but this is one Dataset, the {str(data.split)!r} split")
    if not isinstance(data, hf.Dataset):
        raise TypeError(f"{where}: expected a datasets.Dataset or DatasetDict, got {type(data).__name__}")
    table = data.to_pandas()  # image features stay {"bytes", "path"}: nothing is decoded here
    for name, feature in data.features.items():
        if isinstance(feature, hf.ClassLabel):
            table[name] = _label_names(table[name], feature.names)
        elif isinstance(getattr(feature, "feature", None), hf.ClassLabel):  # a list of class labels
            names = feature.feature.names
            table[name] = [None if v is None else _label_names(list(v), names) for v in table[name]]
    return table


def _hf_split(splits: Any, split: str | None, where: str) -> Any:
    names = list(splits)
    if split is None:
        if len(names) == 1:
            return splits[names[0]]
        raise ValueError(f"{where}: a DatasetDict with the splits {names}; pick one with split= "
                         f"(YAML data.split), or pass dataset[{names[0]!r}]")  # fmt: skip
    if split not in splits:
        raise ValueError(f"{where}: no split {split!r}; the splits are {names}")
    return splits[split]


def _numbers_per_cell(cells: pd.Series) -> pd.Series:
    """A text column that is mostly numbers, with its number cells as numbers (ints if all are whole) and
    its other cells as the text they were; any other column as it is."""
    if pd.api.types.is_numeric_dtype(cells) or pd.api.types.is_bool_dtype(cells):
        return cells
    present = cells.notna()
    texts = cells[present].astype(str)
    numbers = pd.to_numeric(texts, errors="coerce")  # per cell: NaN where a cell is not a number
    parsed = numbers.notna()
    if not parsed.mean() > 0.5:  # mostly text (or empty): labels, kept as they are
        return cells
    whole = bool(np.isfinite(numbers[parsed]).all() and (numbers[parsed] % 1 == 0).all())
    out = pd.Series(np.nan, index=cells.index, dtype=object)
    for row, text, number, ok in zip(texts.index, texts, numbers, parsed):
        out[row] = (int(number) if whole else float(number)) if ok else text
    return out


def _distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance-like field: <= 0 inside the shape of radius ``r`` centred at 0."""
    if shape == "circle":
        return np.hypot(dx, dy) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - r
    # Equilateral triangle pointing up, circumradius r (inradius r / 2).
    c, s = np.sqrt(3) / 2, 0.5
    return np.maximum.reduce([dy, -c * dx - s * dy, c * dx - s * dy]) - r / 2


def shapes(n: int = 512, *, size: int = 64, seed: int = 0) -> pd.DataFrame:
    """Generate ``n`` RGB images of one bright shape each, on a dark noisy background.

    Columns: ``image`` (uint8 array, size x size x 3), ``size`` (float: the shape's
    radius, half-side or triangle circumradius in pixels, 0.15..0.45 of ``size``; a
    regression target), ``filled`` (bool: filled or hollow outline; binary) and
    ``shape`` (one of SHAPES; categorical). Shapes and fill are balanced, position
    and colour random; the same ``seed`` gives the same data. Learnable from pixels
    by a small CNN, so the whole flow can be tried without downloading anything.

    Example: ``df = shapes(256, size=32, seed=1)``
    """
    if n < 1 or size < 16:
        raise ValueError(f"need n >= 1 and size >= 16, got n={n}, size={size}")
    rng = np.random.default_rng(seed)
    kinds = rng.permutation(np.arange(n) % len(SHAPES))
    filled = rng.permutation(np.arange(n) % 2 == 0)
    radii = rng.uniform(0.15, 0.45, n) * size
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    images = []
    for kind, fill, r in zip(kinds, filled, radii):
        cx, cy = rng.uniform(r, size - r, 2)
        d = _distance(SHAPES[kind], xs - cx, ys - cy, r)
        mask = d <= 0 if fill else (d <= 0) & (d > -max(1.5, r / 5))
        image = rng.integers(0, 50, (size, size, 3), dtype=np.uint8)
        image[mask] = rng.integers(140, 256, 3, dtype=np.uint8)
        images.append(image)
    return pd.DataFrame(
        {
            "image": pd.Series(images, dtype=object),
            "size": radii,
            "filled": filled,
            "shape": [SHAPES[k] for k in kinds],
        }
    )

"""The data stage: table -> encoded sets (encoding.prepare) -> batches; seeded splits; rows named as in the table."""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import manyheads as mh
from conftest import make_heads, make_table
from manyheads import encoding, runs
from manyheads.config import SplitConfig
from manyheads.encoding import Batches, Encoded, prepare, seeded_parts, split_rows
from manyheads.images import Augment

CPU = torch.device("cpu")


def numbered(n: int) -> Encoded:
    """An encoded set whose input is each row's own number: batches show which rows they hold."""
    return Encoded(torch.arange(n).float()[:, None], {}, {})


def rows_of(batches: Batches, epoch: int, start: int = 0) -> list[list[int]]:
    return [x.flatten().long().tolist() for x, _, _ in batches.epoch(epoch, start)]


def frame(n: int = 60) -> pd.DataFrame:
    table = make_table(n)
    columns = {"x": list(table["x"]), **{k: pd.Series(table[k], dtype=object) for k in ("age", "gender", "race")}}
    return pd.DataFrame(columns)


# ---- batches: shards and resume order -----------------------------------------------------------


@pytest.mark.parametrize("n, batch, world", [(64, 8, 2), (60, 7, 3), (48, 5, 4)])
def test_shards_are_disjoint_and_cover_every_row_when_divisible(n, batch, world):
    assert n % world == 0
    for epoch in range(2):
        shards = [set(sum(rows_of(Batches(numbered(n), batch, CPU, seed=3, shard=(r, world)), epoch), []))
                  for r in range(world)]  # fmt: skip
        assert all(len(s) == n // world for s in shards)
        assert all(not (a & b) for i, a in enumerate(shards) for b in shards[i + 1 :])
        assert set().union(*shards) == set(range(n))


def test_a_resumed_epoch_yields_exactly_the_tail_of_the_epoch():
    data = Encoded(torch.randint(0, 256, (37, 3, 8, 8), dtype=torch.uint8), {}, {}, images=True)
    batches = Batches(data, 5, CPU, seed=4, augment=Augment())  # augmentation is drawn per step too
    whole = [x for x, _, _ in batches.epoch(2)]
    for start in (0, 3, len(whole) - 1):
        tail = [x for x, _, _ in batches.epoch(2, start)]
        assert len(tail) == len(whole) - start
        assert all(torch.equal(a, b) for a, b in zip(tail, whole[start:]))
    assert rows_of(Batches(numbered(37), 5, CPU, seed=4), 1) != rows_of(Batches(numbered(37), 5, CPU, seed=4), 2)


def test_only_training_batches_drop_a_final_batch_of_one_row():
    assert len(Batches(numbered(65), 16, CPU)) == 5
    training = Batches(numbered(65), 16, CPU, drop_single=True)
    assert len(training) == 4 and sum(len(rows) for rows in rows_of(training, 0)) == 64
    assert len(Batches(numbered(66), 16, CPU, drop_single=True)) == 5  # a final batch of two rows stays
    assert len(Batches(numbered(64), 16, CPU, drop_single=True)) == 4


# ---- seeded splits --------------------------------------------------------------------------------


@pytest.mark.parametrize("n, fraction", [(10, 0.2), (101, 0.15), (7, 0.01), (40, 0.5)])
def test_validation_fractions_have_their_size_are_disjoint_and_seeded(n, fraction):
    kept, held = split_rows(n, fraction, seed=0)
    assert len(held) == max(1, round(n * fraction)) and len(kept) == n - len(held)
    assert not set(kept) & set(held) and set(kept) | set(held) == set(range(n))
    assert list(kept) == sorted(kept) and list(held) == sorted(held)
    again = split_rows(n, fraction, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip((kept, held), again))
    if n > 20:
        assert not np.array_equal(held, split_rows(n, fraction, seed=1)[1])
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_rows(n, 1.0)


def test_one_seeded_permutation_serves_fit_and_run_splits():
    # recorded before the two splits shared one implementation: split.json of existing runs stays valid
    split = runs.Split.of(20, SplitConfig(test=0.15, validation=0.1, seed=3))
    assert split.test.tolist() == [12, 16, 18] and split.validation.tolist() == [3, 8]
    assert split.train.tolist() == [0, 1, 2, 4, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 19]
    assert [a.tolist() for a in split_rows(12, 0.25, seed=5)] == [[0, 2, 3, 4, 5, 6, 7, 8, 10], [1, 9, 11]]
    test, validation, train = seeded_parts(20, [3, 2], seed=3)
    assert (test.tolist(), validation.tolist(), train.tolist()) == (
        split.test.tolist(), split.validation.tolist(), split.train.tolist()
    )  # fmt: skip


# ---- prepare --------------------------------------------------------------------------------------


def test_prepare_encodes_train_and_a_held_out_fraction():
    df = frame(80)
    data = prepare(df, 0.25, make_heads(), seed=0)
    assert (len(data.train), len(data.validation), data.bad, data.input_column) == (60, 20, [], "x")
    kept, held = split_rows(80, 0.25, seed=0)
    assert torch.equal(data.validation.inputs, torch.as_tensor(np.stack(df["x"].to_numpy()[held])))
    assert data.train.labelled["age"].all() and set(data.train.targets) == {"age", "gender", "race"}
    assert data.on(CPU) is data  # on the CPU the sets stay as they are
    separate = prepare(df.iloc[:50], df.iloc[50:], make_heads(), inputs="x")
    assert (len(separate.train), len(separate.validation)) == (50, 30)
    assert prepare(df, None, make_heads()).validation is None


def test_prepare_lists_skipped_rows_of_both_parts_named_as_in_the_users_table():
    df = frame(40)
    kept, held = split_rows(40, 0.25, seed=0)
    df.loc[[kept[-1], held[0]], "race"] = "zebra"
    with pytest.warns(UserWarning, match="skipped 2 bad rows"):
        data = prepare(df, 0.25, make_heads(), seed=0, on_bad="skip")
    named = sorted((b.row, b.split or "train") for b in data.bad)
    assert named == sorted([(int(held[0]), "validation"), (int(kept[-1]), "train")])
    assert (len(data.train), len(data.validation)) == (29, 9)


# ---- reliability: the user's rows, duplicated columns, empty tables, one row, unlabelled heads ---------


def test_a_dataframe_with_its_own_index_is_named_by_index_label():
    df = frame(30)
    df.index = [f"p{i}" for i in range(30)]
    df.loc["p7", "race"] = "zebra"
    with pytest.raises(ValueError, match=r"head 'race', column 'race', row 'p7' \(index label\): 'zebra'"):
        prepare(df, None, make_heads())
    with pytest.warns(UserWarning):
        data = prepare(df, 0.2, make_heads(), seed=0, on_bad="skip")
    assert [b.row for b in data.bad] == ["p7"] and "row 'p7' (index label)" in data.bad[0].message


def test_an_integer_index_names_its_labels_even_inside_a_validation_split():
    df = frame(40)
    df.index = range(100, 140)
    kept, _ = split_rows(40, 0.25, seed=0)
    df.loc[100 + kept[-1], "age"] = "old"  # the last training row of the split, row kept[-1] of 40
    with pytest.raises(ValueError, match=rf"row {100 + kept[-1]} \(index label\): regression target"):
        mh.fit(mh.MultiHeadNet(nn.Linear(8, 4), make_heads()), df, validation=0.25, seed=0, epochs=1, progress=False)
    shuffled = frame(10).sample(frac=1.0, random_state=0)  # a shuffled default index is not the default
    assert [name.label for name in encoding.row_names(shuffled)] == shuffled.index.tolist()
    assert encoding.row_names(frame(10)) is None and encoding.row_names(make_table(10)) is None


def test_duplicated_dataframe_columns_are_named():
    df = frame(20)
    df = pd.concat([df, df[["race"]]], axis=1)
    with pytest.raises(ValueError, match="more than one column named 'race'"):
        encoding.columns_of(df)
    with pytest.raises(ValueError, match="more than one column named 'race'"):
        mh.fit(mh.MultiHeadNet(nn.Linear(8, 4), make_heads()), df, epochs=1, progress=False)


@pytest.mark.parametrize("where", ["train", "validation"])
def test_an_empty_table_says_0_rows(where):
    df = frame(20)
    train, validation = (df.iloc[:0], None) if where == "train" else (df, df.iloc[:0])
    with pytest.raises(ValueError, match=f"{where}: the data has 0 rows"):
        mh.fit(mh.MultiHeadNet(nn.Linear(8, 4), make_heads()), train, validation=validation, epochs=1, progress=False)


def bn_net() -> mh.MultiHeadNet:
    torch.manual_seed(0)
    return mh.MultiHeadNet(nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU()), make_heads())


def test_a_final_batch_of_one_row_is_dropped_so_batchnorm_trains():
    result = mh.fit(bn_net(), frame(65), batch_size=16, epochs=1, seed=0, progress=False)
    assert result.history["train/race/labels"].iloc[0] == 64  # 4 batches of 16; the 65th row waits for a reshuffle


def test_one_training_row_is_refused_saying_so():
    with pytest.raises(ValueError, match="the training data has 1 row; training needs at least 2"):
        mh.fit(bn_net(), frame(1), epochs=1, progress=False)


def test_a_head_without_labels_is_refused_unless_allowed():
    df = frame(40)
    df["age"] = None
    with pytest.raises(ValueError, match=r"head\(s\) \['age'\] have no labelled row in the training data"):
        mh.fit(bn_net(), df, epochs=1, progress=False)
    with pytest.warns(UserWarning, match=r"head\(s\) \['age'\] have no labelled row"):
        result = mh.fit(bn_net(), df, epochs=1, progress=False, allow_unlabelled_heads=True)
    assert result.history["train/age/labels"].iloc[0] == 0 and np.isfinite(result.history["train/race/loss"]).all()
    partly = frame(40)
    partly.loc[:38, "age"] = None  # one labelled row is enough
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare(partly, None, make_heads())

import math

import numpy as np
import pandas as pd
import pytest
import torch

import manyheads as mh
from manyheads.heads import REGISTRY, head_from_spec, is_missing
from manyheads.losses import resolve

ALL_KINDS = [
    mh.Regression(),
    mh.Binary(["male", "female"]),
    mh.Binary(),
    mh.Categorical(["a", "b", "c"]),
    mh.Ordinal(["low", "mid", "high", "top"]),
    mh.MultiLabel(["x", "y", "z"]),
]


def test_missing_values():
    for value in (None, float("nan"), np.nan, pd.NA, np.float32("nan")):
        assert is_missing(value)
    for value in (0, 0.0, "", False, "nan"):
        assert not is_missing(value)


@pytest.mark.parametrize("head", ALL_KINDS, ids=repr)
def test_every_kind_resolves_its_default_loss_and_round_trips(head):
    loss = resolve({"h": head})["h"]
    assert loss.name == head.default_loss and loss.name in head.losses
    rebuilt = head_from_spec(head.spec())
    assert type(rebuilt) is type(head) and rebuilt.spec() == head.spec()
    if head.kind in ("binary", "categorical", "multilabel"):
        smoothed = head_from_spec({**head.spec(), "label_smoothing": 0.1})
        assert smoothed.label_smoothing == 0.1 and head_from_spec(smoothed.spec()).spec() == smoothed.spec()
    assert {"regression", "binary", "categorical", "ordinal", "multilabel", "distribution"} <= set(REGISTRY)


def test_default_losses_follow_mathematica():
    assert mh.Regression().default_loss == "mse"
    assert mh.Binary().default_loss == "bce"
    assert mh.Categorical(["a", "b"]).default_loss == "cross_entropy"


def test_regression_encoding_and_errors():
    target, labelled = mh.Regression().encode([1, 2.5, None, np.nan], name="age")
    assert target.tolist()[:2] == [1.0, 2.5] and labelled.tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match=r"head 'age', column 'age', row 1: regression target must be a number"):
        mh.Regression().encode([3, "old"], name="age")
    with pytest.raises(ValueError, match="row 0"):
        mh.Regression().encode([float("inf")], name="age")


def test_binary_accepts_labels_bools_and_indices():
    head = mh.Binary(["male", "female"])
    target, labelled = head.encode(["female", "male", 1, 0, True, None], name="gender")
    assert target.tolist()[:5] == [1.0, 0.0, 1.0, 0.0, 1.0] and not labelled[5]
    with pytest.raises(ValueError, match=r"head 'gender'.*row 0: 'other' is not one of the head's labels"):
        head.encode(["other"], name="gender")
    assert head.decode(torch.tensor([2.0, -1.0])) == ["female", "male"]
    assert mh.Binary().decode(torch.tensor([2.0, -1.0])) == [True, False]


def test_categorical_names_and_indices():
    head = mh.Categorical(["White", "Black", "Asian"])
    target, _ = head.encode(["Asian", 0, "Black", np.int64(2)], name="race")
    assert target.tolist() == [2, 0, 1, 2]
    with pytest.raises(ValueError, match="row 0: 5 is not one of the head's labels"):
        head.encode([5], name="race")
    numbered = mh.Categorical([10, 20, 30])  # numeric labels are never read as indices
    assert numbered.encode([20], name="n")[0].tolist() == [1]
    with pytest.raises(ValueError):
        numbered.encode([1], name="n")
    probabilities = head.proba(torch.tensor([[0.0, 0.0, 5.0]]))
    assert probabilities.sum().item() == pytest.approx(1.0) and head.decode(torch.tensor([[0.0, 0.0, 5.0]])) == [
        "Asian"
    ]


def test_multilabel_sets_and_vectors():
    head = mh.MultiLabel(["x", "y", "z"])
    target, labelled = head.encode([["x", "z"], [0, 1, 0], "y", None], name="tags")
    assert target.tolist()[:3] == [[1, 0, 1], [0, 1, 0], [0, 1, 0]] and labelled.tolist() == [True, True, True, False]
    assert head.decode(torch.tensor([[1.0, -1.0, 2.0]])) == [["x", "z"]]


def test_ordinal_decodes_thresholds():
    head = mh.Ordinal(["0-9", "10-19", "20-29"])
    assert head.out_features == 2
    logits = torch.tensor([[5.0, 5.0], [5.0, -5.0], [-5.0, -5.0]])
    assert head.decode(logits) == ["20-29", "10-19", "0-9"]
    assert torch.allclose(head.proba(logits).sum(dim=1), torch.ones(3))


def test_class_weights():
    head = mh.Categorical(["a", "b"], class_weights="balanced")
    target, labelled = head.encode(["a", "a", "a", "b"], name="h")
    weights = head.class_weight_vector(target, labelled)
    assert weights.tolist() == pytest.approx([4 / 6, 4 / 2])
    mapped = mh.Categorical(["a", "b"], class_weights={"b": 3.0}).class_weight_vector(target, labelled)
    assert mapped.tolist() == [1.0, 3.0]
    with pytest.raises(ValueError, match="class_weights names labels"):
        mh.Categorical(["a", "b"], class_weights={"q": 1}).class_weight_vector(target, labelled)


def test_bad_head_definitions():
    with pytest.raises(ValueError, match="at least 2 labels"):
        mh.Categorical(["only"])
    with pytest.raises(ValueError, match="distinct"):
        mh.Categorical(["a", "a"])
    with pytest.raises(ValueError, match="unknown head kind"):
        head_from_spec({"kind": "nope"})
    assert not math.isnan(mh.Regression().encode([1.0])[0].item())


def test_readout_is_probabilities_for_classifiers_and_values_for_regression():
    assert mh.Regression().readout(torch.tensor([[2.5]])).tolist() == [2.5]
    probabilities = mh.Categorical(["a", "b"]).readout(torch.tensor([[0.0, 0.0]]))
    assert probabilities.tolist() == [[0.5, 0.5]]
    assert mh.Binary().readout(torch.tensor([0.0])).tolist() == [[0.5, 0.5]]


def test_a_number_that_spells_a_label_means_that_label_not_an_index():
    head = mh.Categorical(["1", "2", "3+"])  # a CSV column read as numbers where it could be
    target, _ = head.encode([1, 2.0, "3+", "2"], name="children")
    assert target.tolist() == [0, 1, 2, 1]
    assert mh.Categorical(["a", "b", "c"]).encode([0, 2], name="x")[0].tolist() == [0, 2]  # indices still work

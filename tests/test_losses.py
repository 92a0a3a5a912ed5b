import pytest
import torch

import manyheads as mh
from manyheads.losses import resolve


def test_override_and_weights_resolve():
    heads = {"age": mh.Regression(), "gender": mh.Binary()}
    resolved = resolve(heads, {"age": "mae"}, {"gender": 5})
    assert resolved["age"].name == "mae" and resolved["gender"].weight == 5.0
    assert "age: mae" in repr(resolved) and "gender: bce x 5" in repr(resolved)


@pytest.mark.parametrize(
    "losses, weights, message",
    [
        ({"height": "mse"}, None, r"losses names heads \['height'\] that do not exist"),
        (None, {"height": 2}, r"weights names heads \['height'\]"),
        ({"age": "nope"}, None, "unknown loss 'nope' for head 'age'; available"),
        ({"age": "cross_entropy"}, None, "does not fit head 'age'"),
        (None, {"age": -1}, "the weight of head 'age' must be a finite number >= 0; got -1"),
        (None, {"age": float("nan")}, "the weight of head 'age' must be a finite number >= 0; got nan"),
        (None, {"age": float("inf")}, "the weight of head 'age' must be a finite number >= 0; got inf"),
    ],
)
def test_bad_loss_specs(losses, weights, message):
    with pytest.raises(ValueError, match=message):
        resolve({"age": mh.Regression()}, losses, weights)


def test_masked_mean_ignores_unlabelled_rows_and_never_nans():
    loss = resolve({"age": mh.Regression()}, {"age": "mae"})["age"]
    output = torch.tensor([1.0, 2.0, 100.0])
    target = torch.tensor([0.0, 0.0, 0.0])
    labelled = torch.tensor([True, True, False])
    assert loss(output, target, labelled).item() == pytest.approx(1.5)
    none = loss(output, target, torch.zeros(3, dtype=torch.bool))
    assert none.item() == 0.0


def test_class_weighted_cross_entropy_matches_torch():
    loss = resolve({"r": mh.Categorical(["a", "b", "c"])})["r"]
    loss.class_weight = torch.tensor([1.0, 2.0, 0.5])
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1, 2, 1, 0, 2])
    expected = torch.nn.functional.cross_entropy(logits, target, weight=loss.class_weight)
    assert loss(logits, target, torch.ones(6, dtype=torch.bool)).item() == pytest.approx(expected.item(), rel=1e-5)


def test_focal_is_smaller_than_cross_entropy_on_easy_examples():
    heads = {"r": mh.Categorical(["a", "b"])}
    focal, ce = resolve(heads, {"r": "focal"})["r"], resolve(heads)["r"]
    logits, target, labelled = torch.tensor([[4.0, -4.0]]), torch.tensor([0]), torch.tensor([True])
    assert 0 < focal(logits, target, labelled) < ce(logits, target, labelled) / 100


def test_custom_loss_sees_labelled_rows_only_and_shape_is_checked():
    seen = {}

    def custom(output, target):
        seen["n"] = output.shape[0]
        return (output - target).abs()

    loss = resolve({"age": mh.Regression()}, {"age": custom})["age"]
    labelled = torch.tensor([True, False, True])
    loss(torch.zeros(3), torch.ones(3), labelled)
    assert seen["n"] == 2
    bad = resolve({"age": mh.Regression()}, {"age": lambda o, t: torch.zeros(5)})["age"]
    with pytest.raises(ValueError, match="custom loss for head 'age' returned shape"):
        bad(torch.zeros(3), torch.ones(3), labelled)


def test_torch_loss_module_is_accepted():
    loss = resolve({"age": mh.Regression()}, {"age": torch.nn.L1Loss()})["age"]
    assert loss.name == "L1Loss"
    assert loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([True, True])).item() == 1.0


def test_corn_loss_prefers_the_right_rank():
    loss = resolve({"o": mh.Ordinal(["a", "b", "c"])})["o"]
    target, labelled = torch.tensor([2]), torch.tensor([True])
    right = loss(torch.tensor([[5.0, 5.0]]), target, labelled)
    wrong = loss(torch.tensor([[-5.0, -5.0]]), target, labelled)
    assert right < 0.05 < wrong


def test_label_smoothing_matches_torch_and_keeps_class_weights_on_the_true_class():
    labelled = torch.ones(6, dtype=torch.bool)
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1, 2, 1, 0, 2])
    smooth = resolve({"r": mh.Categorical(["a", "b", "c"], label_smoothing=0.2)})["r"]
    expected = torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.2)
    assert smooth(logits, target, labelled).item() == pytest.approx(expected.item(), rel=1e-5)
    plain = resolve({"r": mh.Categorical(["a", "b", "c"])})["r"]
    assert smooth(logits, target, labelled).item() != pytest.approx(plain(logits, target, labelled).item())
    smooth.class_weight = torch.tensor([1.0, 0.0, 0.0])  # only rows of class "a" count
    rows = target == 0
    expected = torch.nn.functional.cross_entropy(logits[rows], target[rows], label_smoothing=0.2)
    assert smooth(logits, target, labelled).item() == pytest.approx(expected.item(), rel=1e-5)

    gender = resolve({"g": mh.Binary(label_smoothing=0.1)})["g"]
    logit, female = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.0])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logit, torch.tensor([0.95, 0.05, 0.05]))
    assert gender(logit, female, torch.ones(3, dtype=torch.bool)).item() == pytest.approx(expected.item(), rel=1e-5)


def test_label_smoothing_refuses_losses_it_cannot_reach():
    ordinal = mh.Ordinal(["low", "mid", "high"], label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing on head 'o' applies to the built-in losses"):
        resolve({"o": ordinal})  # CORN's targets are thresholds, not classes
    assert resolve({"o": ordinal}, {"o": "cross_entropy"})["o"].name == "cross_entropy"
    with pytest.raises(ValueError, match="a custom loss smooths its own targets"):
        resolve({"r": mh.Categorical(["a", "b"], label_smoothing=0.1)}, {"r": torch.nn.CrossEntropyLoss()})
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
        mh.Categorical(["a", "b"], label_smoothing=1.0)


def test_focal_with_label_smoothing_stays_a_softmax_loss_on_categorical_heads():
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 2, 1, 2])
    focal = resolve({"r": mh.Categorical(["a", "b", "c"], label_smoothing=0.3)}, {"r": "focal"})["r"]
    soft = torch.nn.functional.one_hot(target, 3).float() * 0.7 + 0.1
    ce = torch.nn.functional.cross_entropy(logits, soft, reduction="none")
    expected = ((1 - torch.exp(-ce)) ** 2 * ce).mean()
    assert focal(logits, target, torch.ones(4, dtype=torch.bool)).item() == pytest.approx(expected.item(), rel=1e-5)

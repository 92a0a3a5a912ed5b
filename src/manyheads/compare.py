"""Compare: does training the heads jointly help? Joint models against one single-head model per head.

For each seed, one model per head is trained alone and one joint model per balancing strategy,
all with the same trunk, data split, epochs, batch size, learning rate and seed; every model is
then scored on the same held-out test split. ``difference`` is signed so that a positive value
means the joint model is better (lower error, or higher accuracy / F1 / AUROC).

    table = mh.compare(lambda heads: mh.MultiHeadNet("resnet18", heads), df, heads=heads, epochs=10)
    write_comparison(table, "runs/compare")
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from manyheads import columns, encoding
from manyheads import images as imaging
from manyheads.heads import Head
from manyheads.inference import score as score_on
from manyheads.metrics import LOWER_IS_BETTER
from manyheads.net import MultiHeadNet
from manyheads.training import fit

NetFactory = Callable[[dict[str, Head]], MultiHeadNet]
NOT_OPTIONS = {"seed": "seeds=", "resume": "nothing (compare trains fresh models)"}


def _factory(net_factory: NetFactory | MultiHeadNet | str, heads: Mapping[str, Head] | None):
    """A function heads -> fresh MultiHeadNet, and the heads of the joint model."""
    if isinstance(net_factory, MultiHeadNet):
        template = net_factory
        if template.outputs_dict:
            raise ValueError(
                "compare cannot split an outputs_dict module into single-head models; pass "
                "net_factory=lambda heads: MultiHeadNet(trunk, heads) building a trunk with head layers"
            )

        def rebuild(subset: dict[str, Head]) -> MultiHeadNet:
            # Every model starts from the same trunk weights (pretrained or not): a deep copy.
            net = MultiHeadNet(
                copy.deepcopy(template.trunk),
                subset,
                image_size=template.image_size,
                dropout=template.dropout,
                hidden={name: units for name, units in template.hidden.items() if name in subset},
                tta=template.tta,
            )
            net.backbone = template.backbone
            return net

        return rebuild, dict(heads or template.heads)
    if isinstance(net_factory, str):
        name = net_factory
        build = lambda subset: MultiHeadNet(name, subset)  # noqa: E731
    elif callable(net_factory):
        build = net_factory
    else:
        raise ValueError(f"net_factory must be a function heads -> MultiHeadNet, a MultiHeadNet or a backbone name, "
                         f"got {type(net_factory).__name__}")  # fmt: skip
    if not heads:
        raise ValueError("with a net_factory, pass heads={name: mh.Regression(), ...} for the joint model")

    def checked(subset: dict[str, Head]) -> MultiHeadNet:
        net = build(dict(subset))
        if not isinstance(net, MultiHeadNet) or set(net.heads) != set(subset):
            got = sorted(net.heads) if isinstance(net, MultiHeadNet) else type(net).__name__
            raise ValueError(f"net_factory({sorted(subset)}) must return a MultiHeadNet with those heads, got {got}")
        return net

    return checked, dict(heads)


def _label(strategy: Any) -> str:
    if isinstance(strategy, str):
        return strategy
    if isinstance(strategy, Mapping):
        return "constant(" + ",".join(f"{k}={v:g}" for k, v in strategy.items()) + ")"
    return type(strategy).__name__


def _for_head(options: dict, head: str) -> dict:
    """Fit options for the model of ``head`` alone: per-head mappings restricted, monitor its own."""
    options = dict(options)
    if isinstance(options.get("losses"), Mapping):
        options["losses"] = {k: v for k, v in options["losses"].items() if k == head}
    monitor = options.get("monitor")
    if monitor is not None:  # keep the columns of this head; others' columns: select on its own loss
        mix = {monitor: 1.0} if isinstance(monitor, str) else dict(monitor)
        own = {column: w for column, w in mix.items() if columns.head_of(column) == head}
        options["monitor"] = (next(iter(own)) if isinstance(monitor, str) else own) if own else None
    return options


def _parameters(net: MultiHeadNet) -> int:
    return sum(p.numel() for p in net.parameters())


def rows_of(heads: dict[str, Head], label: str, seed: int, joint: dict, singles: dict, all_metrics: bool) -> list[dict]:
    """Table rows of one joint model against the single-head models of the same seed.

    ``joint`` and each of ``singles[head]`` are ``{"scores": {"test/age/mae": ...}, "seconds", "params"}``.

        rows_of(heads, "constant", 0, joint, {"age": alone, "gender": ...}, all_metrics=False)
    """
    rows = []
    for head, kind in heads.items():
        names = [kind.primary]
        if all_metrics:
            names += [c.metric for k in joint["scores"] if (c := columns.parse(k)) and c[:2] == ("test", head)]
            names = list(dict.fromkeys(n for n in names if n != "labels"))
        for metric in names:
            joint_value = joint["scores"].get(columns.name("test", head, metric), float("nan"))
            single_value = singles[head]["scores"].get(columns.name("test", head, metric), float("nan"))
            higher = metric not in LOWER_IS_BETTER
            rows.append({
                "head": head, "metric": metric, "strategy": label, "seed": seed,
                "joint": joint_value, "single": single_value,
                "difference": (joint_value - single_value) if higher else (single_value - joint_value),
                "higher_is_better": higher, "test_labels": joint["scores"].get(columns.name("test", head, "labels"), 0),
                "joint_seconds": joint["seconds"], "single_seconds": singles[head]["seconds"],
                "singles_seconds": sum(s["seconds"] for s in singles.values()), "joint_params": joint["params"],
                "single_params": singles[head]["params"], "singles_params": sum(s["params"] for s in singles.values()),
            })  # fmt: skip
    return rows


def compare(
    net_factory: NetFactory | MultiHeadNet | str,
    train: Any,
    *,
    test: Any = None,
    heads: Mapping[str, Head] | None = None,
    strategies: Sequence[Any] = ("constant",),
    seeds: Sequence[int] = (0,),
    test_fraction: float = 0.15,
    inputs: str | None = None,
    split_seed: int = 0,
    all_metrics: bool = False,
    verbose: bool = True,
    **fit_options: Any,
) -> pd.DataFrame:
    """Train joint and single-head models alike and score them on one test split; one row per head.

    ``net_factory(heads)`` builds a fresh net for a heads dict (a :class:`MultiHeadNet` instance is
    rebuilt from a copy of its trunk; a backbone name builds ``MultiHeadNet(name, heads)``).
    ``strategies`` are values for ``weights=`` (names, or mappings of constant weights); the
    single-head models do not depend on them. Without ``test`` the table ``train`` is split once
    (``test_fraction``, ``split_seed``). Other keywords go to :func:`manyheads.fit` for every model;
    image files are decoded once into a temporary cache unless ``cache_dir=`` names one to keep.

    Columns: head, metric (the head kind's primary one, or all with ``all_metrics=True``),
    strategy, seed, joint, single, difference (positive = joint better), higher_is_better,
    test_labels, joint_seconds, single_seconds, singles_seconds (all single models together),
    joint_params, single_params, singles_params (sum over the single models).

        table = mh.compare(net, df, strategies=("constant", "uncertainty"), seeds=(0, 1), epochs=5)
    """
    from manyheads.validation import check_compare_options

    # every option, strategy and seed is checked before the first of many models trains
    strategies = check_compare_options(strategies, seeds, fit_options, NOT_OPTIONS)  # takes weights= out
    build, heads = _factory(net_factory, heads)
    table = encoding.columns_of(train, "train")
    input_name = encoding.input_column(table, heads, inputs)
    if test is None:
        train_table, test_table = encoding.split(table, test_fraction, split_seed)
    else:
        train_table, test_table = table, encoding.columns_of(test, "test")
    run_dir = fit_options.pop("run_dir", None)
    scratch = None
    column = table[input_name]
    if fit_options.get("cache_dir") is None and all(isinstance(v, str | os.PathLike) for v in column):
        if imaging.looks_like_images(column):  # image files: decode them once for all models, not per model
            scratch = tempfile.TemporaryDirectory(prefix="manyheads-compare-")
            fit_options["cache_dir"] = scratch.name
    encoded: dict[Any, encoding.Encoded] = {}

    def score(net: MultiHeadNet, result) -> dict[str, float]:
        size = fit_options.get("image_size") or net.image_size
        if size not in encoded:  # encode the test split once per image size
            encoded[size] = encoding.encode(
                test_table, heads, input_name, image_size=size, on_bad=fit_options.get("on_bad", "error"),
                cache_dir=fit_options.get("cache_dir"), workers=fit_options.get("workers"),
            )  # fmt: skip
        batch = max(int(fit_options.get("batch_size", 64)), 256)
        return score_on(net, encoded[size], result.losses, batch_size=batch, prefix="test")

    total = len(seeds) * (len(heads) + len(strategies))
    count = 0

    def train_one(subset: dict[str, Head], seed: int, what: str, options: dict, folder: str):
        nonlocal count
        count += 1
        if verbose:
            print(f"compare [{count}/{total}] seed {seed}: {what} ...", flush=True)
        torch.manual_seed(seed)  # same initial trunk for the joint and the single models of a seed
        net = build(subset)
        start = time.perf_counter()
        where = None if run_dir is None else Path(run_dir) / f"seed{seed}" / folder
        result = fit(net, train_table, inputs=input_name, seed=seed, run_dir=where, **options)
        seconds = time.perf_counter() - start
        scores = score(result.net, result)
        if verbose:
            shown = ", ".join(
                f"{h} {k.primary} {scores.get(columns.name('test', h, k.primary), float('nan')):.4g}"
                for h, k in subset.items()
            )
            print(f"compare [{count}/{total}] done in {seconds:.1f}s: test {shown}", flush=True)
        return {"scores": scores, "seconds": seconds, "params": _parameters(result.net)}

    rows = []
    try:
        for seed in seeds:
            singles = {
                head: train_one({head: kind}, seed, f"{head} alone", _for_head(fit_options, head), f"single-{head}")
                for head, kind in heads.items()
            }
            for strategy in strategies:
                label = _label(strategy)
                joint = train_one(
                    heads, seed, f"joint, weights={label}", {**fit_options, "weights": strategy}, f"joint-{label}"
                )
                rows += rows_of(heads, label, seed, joint, singles, all_metrics)
    finally:
        if scratch is not None:
            scratch.cleanup()
    frame = pd.DataFrame(rows)
    frame.attrs["difference"] = "positive = the joint model is better"
    return frame

"""Does joint training help? The comparison table of ``manyheads compare``, from runs trained one by one.

At the flagship's budget each model is a half-hour run on the CPU, so the joint model and the
single-head models are trained as separate ``manyheads train`` runs (one at a time, or on several
machines) and this script puts their test reports side by side: the same columns, summary,
``comparison.csv``/``.md``/``.png`` as ``manyheads compare``, plus each model's validation figures at
the epoch it kept. It refuses runs that do not share the test rows, the training seed or the
options other than the heads, naming the folder and what differs.

    manyheads train examples/utkface.yaml --out runs/joint
    manyheads train examples/utkface.yaml --out runs/age 'heads={age: {kind: distribution, ...}}'   # one per head
    python benchmarks/compare_runs.py --joint runs/joint --single runs/age --single runs/gender \\
        --single runs/race --out runs/compare
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import common
import pandas as pd
import yaml

import manyheads as mh
from manyheads import columns
from manyheads.compare import rows_of
from manyheads.config import parse_config
from manyheads.metrics import LOWER_IS_BETTER
from manyheads.reports import summarize, write_comparison

STRATEGY = "joint run"  # the table's strategy column: the joint run's own weights
SAME = ("data", "model", "train", "split", "calibrate")  # config sections every run must share


class RunsDiffer(ValueError):
    """Runs that cannot be compared: the message names the folder and what differs."""


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--joint", action="append", required=True, help="a joint run folder (one per seed)")
    parser.add_argument("--single", action="append", required=True, help="a single-head run folder (one per head "
                        "and seed); paired with the joint run of its training seed")  # fmt: skip
    parser.add_argument("--out", default=None, help="folder for comparison.csv/.md/.png")
    parser.add_argument("--write", action="store_true", help="append the results to BENCHMARKS.md")
    parser.add_argument("--output", default=None, help="file --write appends to (default BENCHMARKS.md)")
    return parser.parse_args(argv)


def read_run(folder: str | Path) -> dict[str, Any]:
    """What the table needs of one run folder made by ``manyheads train``: config, split, test report, history."""
    folder = Path(folder)
    needed = ["config.yaml", "split.json", "metrics.json", "history.csv", "summary.json", "model.safetensors"]
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise RunsDiffer(f"{folder}: {missing} not found; give run folders of finished `manyheads train` runs")
    parsed = parse_config(yaml.safe_load((folder / "config.yaml").read_text()), str(folder / "config.yaml"))
    config = parsed.model_dump(mode="json")  # runs written by other versions compare by what they mean
    summary = json.loads((folder / "summary.json").read_text())
    history = pd.read_csv(folder / "history.csv")
    kept = history[history["epoch"] == summary["best_epoch"]].iloc[0] if summary.get("best_epoch") else history.iloc[-1]
    net = mh.load(folder / "model.safetensors")
    report = json.loads((folder / "metrics.json").read_text())["heads"]
    scores = {columns.name("test", head, metric): value for head, entry in report.items()
              for metric, value in {**entry["metrics"], "labels": entry["labelled"]}.items()}  # fmt: skip
    return {
        "folder": folder, "config": config, "heads": list(config["heads"]), "kinds": parsed.build_heads(),
        "test_rows": json.loads((folder / "split.json").read_text())["test_rows"], "report": report,
        # what compare.rows_of reads of a model, as mh.compare measures it
        "scores": scores, "seconds": float(history["seconds"].sum()), "kept": kept,
        "params": sum(p.numel() for p in net.parameters()),
    }  # fmt: skip


def check_alike(joint: dict, single: dict) -> None:
    """Refuse a single-head run that differs from its joint run in anything but the heads."""
    where = single["folder"]
    if len(single["heads"]) != 1 or single["heads"][0] not in joint["heads"]:
        raise RunsDiffer(f"{where}: a single-head run needs one of the joint run's heads {joint['heads']}, "
                         f"it has {single['heads']}")  # fmt: skip
    head = single["heads"][0]
    if single["config"]["heads"][head] != joint["config"]["heads"][head]:
        raise RunsDiffer(f"{where}: head {head!r} is {single['config']['heads'][head]} here and "
                         f"{joint['config']['heads'][head]} in {joint['folder']}")  # fmt: skip
    for section in SAME:
        if single["config"].get(section) != joint["config"].get(section):
            raise RunsDiffer(f"{where}: config section {section!r} differs from {joint['folder']}'s; train both "
                             "from one config, changing only the heads")  # fmt: skip
    if single["test_rows"] != joint["test_rows"]:
        raise RunsDiffer(f"{where}: its test rows differ from {joint['folder']}'s (another split or data folder)")


def pair(joints: list[dict], singles: list[dict]) -> dict[int, tuple[dict, dict[str, dict]]]:
    """Training seed -> (joint run, {head: single run}), every head present once per seed."""
    paired: dict[int, tuple[dict, dict[str, dict]]] = {}
    for joint in joints:
        seed = joint["config"]["train"]["seed"]
        if seed in paired:
            raise RunsDiffer(f"{joint['folder']}: a second joint run of training seed {seed}")
        paired[seed] = (joint, {})
    for single in singles:
        seed = single["config"]["train"]["seed"]
        if seed not in paired:
            joints = sorted(paired)
            raise RunsDiffer(f"{single['folder']}: no joint run of training seed {seed} (joint seeds: {joints})")
        joint, by_head = paired[seed]
        check_alike(joint, single)
        head = single["heads"][0]
        if head in by_head:
            raise RunsDiffer(f"{single['folder']}: a second single run of head {head!r} for seed {seed}")
        by_head[head] = single
    for seed, (joint, by_head) in paired.items():
        absent = [head for head in joint["heads"] if head not in by_head]
        if absent:
            raise RunsDiffer(f"seed {seed}: no single-head run of {absent}; pass one --single per head and seed")
    return paired


def table_of(paired: dict[int, tuple[dict, dict[str, dict]]]) -> pd.DataFrame:
    """The rows ``manyheads compare`` writes, by its own code: per seed, head and test metric."""
    rows = []
    for seed, (joint, singles) in paired.items():
        rows += rows_of(joint["kinds"], STRATEGY, seed, joint, singles, all_metrics=True)
    return pd.DataFrame(rows)


def validation_rows(paired: dict[int, tuple[dict, dict[str, dict]]]) -> list[list[Any]]:
    """Per seed and head: the primary metric on the validation rows at each model's kept epoch."""
    rows = []
    for seed, (joint, singles) in paired.items():
        for head in joint["heads"]:
            primary = joint["report"][head]["primary"]
            key = columns.name("val", head, primary)
            j, s = joint["kept"].get(key, float("nan")), singles[head]["kept"].get(key, float("nan"))
            rows.append([seed, head, primary, j, s, (s - j) if primary in LOWER_IS_BETTER else (j - s),
                         int(joint["kept"]["epoch"]), int(singles[head]["kept"]["epoch"])])  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> str:
    """Read the runs, write the comparison files (with --out), print the Markdown section and return it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    paired = pair([read_run(f) for f in args.joint], [read_run(f) for f in args.single])
    table = table_of(paired)
    if args.out:
        write_comparison(table, args.out)
    primary = {(h, j["report"][h]["primary"]) for j, _ in paired.values() for h in j["heads"]}
    summary = summarize(table)
    summary = summary[[(h, m) in primary for h, m in zip(summary["head"], summary["metric"], strict=True)]]
    test_rows = [[r.head, r.metric, r.seeds, r.single, r.joint, r.difference, r.difference_std, r.joint_better]
                 for r in summary.itertuples()]  # fmt: skip
    first = next(iter(paired.values()))
    joint_time = sum(j["seconds"] for j, _ in paired.values()) / len(paired)
    singles_time = sum(sum(s["seconds"] for s in singles.values()) for _, singles in paired.values()) / len(paired)
    body = "\n\n".join([
        "Test rows (each run's own report, with its test-time flips); difference > 0: the joint model is better.",
        common.table(["head", "metric", "seeds", "single (mean)", "joint (mean)", "difference", "sd", "joint better"],
                     test_rows),
        "Validation rows at the epoch each model kept (what a choice may be made on):",
        common.table(["seed", "head", "metric", "joint", "single", "difference", "joint epoch", "single epoch"],
                     validation_rows(paired)),
        common.table(["", "parameters", "training s (epochs, mean over seeds)"], [
            ["joint model", first[0]["params"], joint_time],
            [f"{len(first[1])} single-head models", sum(s["params"] for s in first[1].values()), singles_time],
        ]),
    ])  # fmt: skip
    folders = [str(j["folder"]) for j, _ in paired.values()] + [str(s["folder"]) for _, ss in paired.values()
                                                               for s in ss.values()]  # fmt: skip
    notes = [f"Runs: {', '.join(folders)}.", "training s: the sum of the history's epoch seconds (training and "
             "validation), without the cache build and the test report."]  # fmt: skip
    return common.publish("Does joint training help? Finished runs side by side", "compare_runs.py", argv, args,
                          body, notes)  # fmt: skip


if __name__ == "__main__":
    try:
        main()
    except RunsDiffer as error:
        sys.exit(f"compare_runs: {error}")

"""The command line: train, evaluate, predict, export, serve, compare and shard, driven by a YAML config.

    manyheads train examples/utkface.yaml --out runs/faces train.epochs=2
    manyheads predict runs/faces face.jpg --json
    manyheads shard labels.csv --out shards --shard-size 1000   # WebDataset shards, to stream

Errors in the input (config, paths, images) print one line to stderr and exit with status 2.
Under ``torchrun --nproc_per_node=N -m manyheads train ...`` only rank 0 writes and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from manyheads import runs
from manyheads.config import RunConfig, load_config


def _with_data(cfg: RunConfig, data: str | None) -> RunConfig:
    """The config with ``--data PATH`` as its data path."""
    if data is None:
        return cfg
    from manyheads import sources

    if not sources.get(cfg.data.source).needs_path:
        raise ValueError(f"--data: the {cfg.data.source} source is generated and reads no files; "
                         "set data.source in the config")  # fmt: skip
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": data})})


def _headline(report: dict) -> str:
    parts = []
    for name, head in report["heads"].items():
        value, interval = head["metrics"].get(head["primary"]), head.get("interval")
        text = f"{name} {head['primary']} {'–' if value is None else format(value, '.4g')}"
        if interval:
            text += f" ({interval['level']:.0%}: {interval['low']:.4g}-{interval['high']:.4g})"
        parts.append(text)
    return " | ".join(parts)


# What `manyheads train` leaves in a run folder: any of them there means the folder holds a run.
RUN_FILES = ("model.safetensors", "checkpoint.pt", "config.yaml", "split.json", "history.csv", "summary.json",
             "report.md", "metrics.json")  # fmt: skip


def _check_out(args: argparse.Namespace) -> None:
    """Refuse to train over a run in ``--out`` unless asked to (--resume or --overwrite); nothing is written."""
    if args.resume and args.out is None:
        raise ValueError("--resume needs --out RUN_DIR, the run folder to continue")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    if args.out is None or args.resume:
        return
    out = Path(args.out)
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not args.overwrite:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise ValueError(
            f"{out} already holds a run ({shown}); continue it with --resume, train into a new --out folder, "
            "or pass --overwrite to replace its files"
        )
    if found and runs.is_main():  # the old run's checkpoint must not be resumed as if it were the new run's
        (out / "checkpoint.pt").unlink(missing_ok=True)


def _train(args: argparse.Namespace) -> None:
    cfg = _with_data(load_config(args.config, args.overrides), args.data)
    _check_out(args)
    name = Path(args.config).stem
    missing = runs.missing_data(cfg.data)
    if missing is not None and args.data is None:
        if runs.is_main():
            print(
                f"note: {missing} not found, so this trains the built-in demo on generated shapes instead (heads "
                "size, filled, shape; seconds on a CPU) to show the whole flow. For the real run put the data "
                "there or pass --data PATH.",
                flush=True,
            )
        cfg, name = runs.DEMO, "shapes-demo"
    out = Path(args.out) if args.out else runs.default_run_dir(name)
    _, report = runs.train(cfg, out, resume=args.resume, progress=not args.quiet)
    if not runs.is_main():
        return
    print(f"\nrun folder: {out}")
    print("  model.safetensors   the trained net (for manyheads evaluate / predict / export / serve)")
    print("  history.csv, learning_curves.png, summary.json   training history; config.yaml, split.json   the setup")
    if report is not None:
        plots = len(list(out.glob("*_errors.png")) + list(out.glob("*_confusion.png")) + list(out.glob("fairness_*")))
        print(f"  report.md, metrics.json (+ {plots} plots)   the test report")
        print(f"test split ({report['rows']} rows, never trained on): {_headline(report)}")


def _evaluate(args: argparse.Namespace) -> None:
    from manyheads.net import load
    from manyheads.reports import evaluate_report
    from manyheads.robustness import shift_names

    shifts = shift_names(args.robustness) if args.robustness else None  # a misspelt shift fails before any work
    run = Path(args.run)
    net = load(runs.model_file(run))
    tta = {"flip": "flip", "none": None}.get(args.tta, net.tta)
    suffix = f"-tta-{args.tta}" if tta != net.tta else ""  # another answer than the run's: its own folder
    net.tta = tta
    if args.data is not None:
        if not (run / "config.yaml").is_file():
            raise FileNotFoundError(f"{run / 'config.yaml'} not found: give the run folder made by `manyheads train`")
        cfg = _with_data(load_config(run / "config.yaml"), str(Path(args.data).resolve()))
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"limit": args.limit})})
        df = runs.load_rows(cfg)
        out = Path(args.out) if args.out else run / f"eval-{Path(args.data).stem}{suffix}"
        note = f"All {len(df)} rows of the {cfg.data.source} data at {cfg.data.path}."
    else:
        cfg, df = runs.load_test_split(run)
        out = Path(args.out) if args.out else (run / f"eval{suffix}" if suffix else run)
        note = f"The run's test split: {len(df)} rows recorded in split.json, never trained on."
    if shifts:
        print(f"robustness: {len(shifts)} shifts ({', '.join(shifts)}), one more inference pass over the "
              f"{len(df)} rows each", flush=True)  # fmt: skip
    report = evaluate_report(net, df, out, inputs=cfg.data.inputs, title="Evaluation report", note=note,
                             robustness=shifts)  # fmt: skip
    print(f"report: {out / 'report.md'}\n{report['rows']} rows: {_headline(report)}")
    for row in report.get("robustness", {}).get("shifts", [])[1:]:  # after "none", the clean row
        print(f"  {row['shift']}: " + " | ".join(f"{n} {'–' if v is None else format(v, '.4g')}"
                                             for n, v in row["metrics"].items()))  # fmt: skip


def _image_files(items: Sequence[str]) -> list[str]:
    """The image files named, a folder standing for its images (sorted by name; subfolders not searched)."""
    from manyheads.images import IMAGE_SUFFIXES

    files = []
    for item in items:
        if not Path(item).is_dir():
            files.append(item)
            continue
        found = sorted(p.name for p in Path(item).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise ValueError(f"{item} is a folder with no images in it (looked for {', '.join(IMAGE_SUFFIXES)} "
                             "files; subfolders are not searched)")  # fmt: skip
        files += [str(Path(item) / name) for name in found]
    return files


def _predict(args: argparse.Namespace) -> None:
    import torch

    from manyheads import images
    from manyheads.inference import raw_outputs
    from manyheads.net import load, set_coverage

    net = load(runs.model_file(args.run))
    if net.image_size is None:
        raise ValueError(f"{args.run}: this model takes no images (it has no image_size), so it cannot predict files")
    if args.coverage is not None:
        set_coverage(net, args.coverage)
    results = []
    files = _image_files(args.images)
    for start in range(0, len(files), 256):  # decoded once, a bounded number at a time
        chunk = files[start : start + 256]
        batch = images.normalize(torch.stack([images.load_rgb(path, net.image_size) for path in chunk]))
        raw = raw_outputs(net, batch)  # one pass: each head's answer and probabilities, as the service gives them
        answers = {name: head.answers(head.readout(raw[name]).cpu().numpy()) for name, head in net.heads.items()}
        for i, image in enumerate(chunk):
            mine = {name: answers[name][i] for name in net.heads}
            entry = {"image": image, "predictions": {name: a["value"] for name, a in mine.items()}, "probabilities": {
                name: {label: round(p, 6) for label, p in a["probabilities"].items()}
                for name, a in mine.items() if "probabilities" in a
            }}  # fmt: skip
            for name, answer in mine.items():  # a calibrated head's interval, uncertainty: "age_interval"
                extras = {f"{name}_{k}": v for k, v in answer.items() if k not in ("value", "probabilities")}
                entry["predictions"] |= extras
            results.append(entry)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    width = max(len(name) for name in net.heads)
    for entry in results:
        print(entry["image"])
        for name in net.heads:
            value, predictions = entry["predictions"][name], entry["predictions"]
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            if f"{name}_interval" in predictions:
                low, high = predictions[f"{name}_interval"]
                text += f"  [{low:.4g}, {high:.4g}]"
            if predictions.get(f"{name}_uncertain"):
                text += "  (uncertain)"
            top = sorted(entry["probabilities"].get(name, {}).items(), key=lambda kv: -kv[1])[: args.top]
            if top:
                text += "   (" + ", ".join(f"{label} {p:.2f}" for label, p in top) + ")"
            print(f"  {name:<{width}}  {text}")


def _export(args: argparse.Namespace) -> None:
    from manyheads.export import export_onnx
    from manyheads.net import load

    path = export_onnx(load(runs.model_file(args.run)), args.onnx)
    print(f"wrote {path}")


def _serve(args: argparse.Namespace) -> None:
    from manyheads.serving import serve

    model = Path(args.model)
    options = ("workers", "backend", "device", "max_batch", "max_wait_ms", "max_queue", "timeout_s", "max_pixels",
               "coverage")  # fmt: skip
    given = {name: getattr(args, name) for name in options if getattr(args, name) is not None}  # the rest: defaults
    serve(runs.model_file(model) if model.is_dir() else model, host=args.host, port=args.port, docs=args.docs, **given)


def _compare(args: argparse.Namespace) -> None:
    from manyheads.compare import compare
    from manyheads.net import MultiHeadNet
    from manyheads.reports import summarize, write_comparison

    cfg = _with_data(load_config(args.config, args.overrides), args.data)
    if cfg.data.is_stream():
        raise ValueError(f"{args.config}: compare trains on tables, and the {cfg.data.source} source is a stream; "
                         "compare on a table source (e.g. the CSV the shards were written from)")  # fmt: skip
    runs.check_offline(cfg.model)
    df = runs.load_table(cfg)
    train, validation, test = runs.Split.of(len(df), cfg.split).parts(df)
    options = cfg.fit_kwargs()
    seed = options.pop("seed")

    def net_factory(heads):
        kwargs = cfg.net_kwargs()
        hidden = {name: units for name, units in kwargs["hidden"].items() if name in heads}
        return MultiHeadNet(**{**kwargs, "heads": heads, "hidden": hidden})

    if args.strategies:
        options.pop("weights")
        options["strategies"] = tuple(s.strip() for s in args.strategies.split(","))
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else (seed or 0,)
    table = compare(net_factory, train, test=test, heads=cfg.build_heads(), validation=validation, seeds=seeds,
                    split_seed=cfg.split.seed, progress=not args.quiet, **options)  # fmt: skip
    out = Path(args.out) if args.out else runs.default_run_dir(f"{Path(args.config).stem}-compare")
    write_comparison(table, out)
    print(summarize(table).to_string(index=False))
    print(f"comparison: {out / 'comparison.md'} (difference > 0: the joint model is better)")


def _shard_tables(args: argparse.Namespace) -> tuple[dict[str, object], int]:
    """The tables `manyheads shard` writes (by subfolder; "" for --out itself) and the batch size of the hint.

    TABLE is a CSV or Parquet file, a data folder read as ``--source`` (utkface, hf, ...), or a run
    config, whose data it writes whole, or with ``--split`` as its train, validation and test parts.
    """
    from manyheads import sources
    from manyheads.config import DataConfig

    path = Path(args.table)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: give a label CSV or Parquet file, a data folder or a run config")
    if path.suffix.lower() in (".yaml", ".yml"):
        cfg = load_config(path, args.overrides)
        if cfg.data.is_stream():
            raise ValueError(f"{path}: its data is shards already (data.source {cfg.data.source})")
        df = runs.load_table(cfg)
        if not args.split:
            return {"": df}, cfg.train.batch_size
        if cfg.split.calibration:
            raise ValueError(f"{path}: --split writes train, validation and test shards; set split.calibration=0 "
                             "(a stream calibrates on data.validation)")  # fmt: skip
        train, validation, test = runs.Split.of(len(df), cfg.split).parts(df)
        found = {"train": train, "validation": validation, "test": test}
        return {name: part for name, part in found.items() if part is not None}, cfg.train.batch_size
    if args.split or args.overrides:
        raise ValueError("--split and key=value overrides need a run config (TABLE.yaml): its split says the parts")
    source = args.source or {".csv": "csv", ".parquet": "parquet"}.get(path.suffix.lower())
    if source is None:
        raise ValueError(f"{path}: name what it is with --source (one of {list(sources.REGISTRY)}), or give a .csv, "
                         ".parquet or .yaml file")  # fmt: skip
    sources.get(source)  # a misspelt source is named before anything is read
    data = DataConfig(source=source, path=str(path), images=args.images, image_column=args.image_column)
    return {"": sources.load(data, image_size=128, seed=0)}, 64


def _shard(args: argparse.Namespace) -> None:
    from manyheads import shards

    tables, batch_size = _shard_tables(args)
    out = Path(args.out)
    for name in tables:  # every folder is checked before any is written
        shards.refuse_existing(out / name if name else out)
    patterns = {}
    for name, table in tables.items():
        folder = os.path.join(args.out, name) if name else args.out
        written = shards.write_shards(table, folder, shard_size=args.shard_size, max_size=args.max_size,
                                      on_bad=args.on_bad, progress=not args.quiet)  # fmt: skip
        patterns[name or "path"] = written.pattern
        first, last = written.shards[0], written.shards[-1]
        print(f"wrote {len(written.shards)} shards ({first}{f' .. {last}' if last != first else ''}), "
              f"{written.samples} samples, {written.bytes / 1e6:.1f} MB of image files, into {folder}")  # fmt: skip
        print(f"  label index: {Path(folder) / shards.INDEX} (the training targets' statistics)")
        if written.skipped:
            print(f"  skipped {len(written.skipped)} bad rows, e.g. {written.skipped[0].message}")
    train = patterns.get("train", patterns.get("path"))
    held = "".join(f', {key}: "{patterns[key]}"' for key in ("validation", "test") if key in patterns)
    samples = sum(len(t) for n, t in tables.items() if n in ("", "train"))
    print(f'in a run config:\n  data: {{source: webdataset, path: "{train}"{held}}}\n'
          f"  train: {{steps_per_epoch: {max(1, samples // batch_size)}}}   # one pass over about {samples} samples "
          f"at batch_size {batch_size}, one process (divide by the processes under torchrun)")  # fmt: skip


def _size(text: str) -> float:
    """A size in bytes: ``100MB``, ``1.5GB``, ``512MiB``, ``1e8``."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if found is None or float(found[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 100MB, 1GB or 5e8")
    number, prefix, binary = found.groups()
    return float(number) * (1024 if binary else 1000) ** " kmgt".index(prefix or " ")


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of samples >= 1")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="manyheads", description="Train one network on many targets at once.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("train", help="train from a YAML config; report on a held-out test split")
    p.add_argument("config", help="YAML run config, e.g. examples/utkface.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=3")
    p.add_argument("--data", help="data path (overrides data.path)")
    p.add_argument("--out", help="run folder (default: runs/<config name>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="train into --out even if it holds a run: its files are replaced (its checkpoint removed first); "
        "other files there stay",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.set_defaults(handler=_train)

    p = commands.add_parser("evaluate", help="re-evaluate a run on its test split, or on other data")
    p.add_argument("run", help="run folder")
    p.add_argument("--data", help="evaluate on all of this data (same source kind as the run's)")
    p.add_argument("--limit", type=int, help="with --data: evaluate on this many rows, evenly spaced")
    p.add_argument("--tta", choices=["flip", "none"], help="test-time augmentation (default: the model's own)")
    p.add_argument(
        "--out",
        help="report folder (default: the run folder, or RUN/eval-<data name> with --data; "
        "RUN/eval-tta-<tta> when --tta changes the model's answers)",
    )
    p.add_argument("--robustness", nargs="?", const="all", metavar="SHIFTS",
                   help="add each head's primary metric on shifted test photos: all shifts, or some, comma-separated "
                   "(zoom_out, jpeg30, blur, brightness, greyscale); one more inference pass each")  # fmt: skip
    p.set_defaults(handler=_evaluate)

    p = commands.add_parser("predict", help="predict every head for image files")
    p.add_argument("run", help="run folder or .safetensors model")
    p.add_argument("images", nargs="+", help="image files, or folders of them")
    p.add_argument("--json", action="store_true", help="print JSON: one object per image")
    p.add_argument("--top", type=int, default=3, help="probabilities shown per classifier head (default 3)")
    p.add_argument("--coverage", type=float, help="calibrated numbers' intervals at this coverage (default: as fitted)")
    p.set_defaults(handler=_predict)

    p = commands.add_parser("export", help="export a run's model to ONNX")
    p.add_argument("run", help="run folder or .safetensors model")
    p.add_argument("--onnx", required=True, help="output .onnx file")
    p.set_defaults(handler=_export)

    p = commands.add_parser("serve", help="serve predictions over HTTP")
    p.add_argument("model", help="run folder, .safetensors or .onnx model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="1-65535 (default 8000)")
    p.add_argument("--max-pixels", type=int, help="largest image accepted, in pixels (default 40000000); "
                   "checked from the header before decoding, 413 above it")  # fmt: skip
    p.add_argument("--docs", action="store_true", help="also serve /docs and /redoc (their scripts load from a CDN)")
    p.add_argument("--workers", type=int, help="model processes behind the one port (default 1); each has its own "
                   "queue and batcher and cores/N threads")  # fmt: skip
    p.add_argument("--backend", choices=["torch", "onnx"], help="default: as the model file is; onnx on a run folder "
                   "exports it on the fly to a temporary file")  # fmt: skip
    p.add_argument("--device", help="cpu (default) or cuda / cuda:N, for the torch backend")
    p.add_argument("--max-batch", type=int, help="most images per model run (default 16; 1: each request alone)")
    p.add_argument("--max-wait-ms", type=float, help="longest wait for more images once one is queued (default 5)")
    p.add_argument("--max-queue", type=int, help="most images waiting for the model (default 128); more: 503 with "
                   "Retry-After")  # fmt: skip
    p.add_argument("--timeout-s", type=float, help="seconds from a request's arrival to its answer (default 10); "
                   "later: 503 with Retry-After")  # fmt: skip
    p.add_argument("--coverage", type=float, help="calibrated numbers' intervals at this coverage (default: as fitted)")
    p.set_defaults(handler=_serve)

    p = commands.add_parser("compare", help="joint model vs one single-head model per head, on the test split")
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--data", help="data path (overrides data.path)")
    p.add_argument("--out", help="folder for comparison.csv/.md/.png (default: runs/<config name>-compare-<time>)")
    p.add_argument("--strategies", help="balancing strategies to compare, comma-separated (default: train.weights)")
    p.add_argument("--seeds", help="seeds, comma-separated (default: train.seed)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_compare)

    p = commands.add_parser("shard", help="write a table's images and labels as WebDataset shards, to stream")
    p.add_argument("table", help="a label CSV or Parquet file, a data folder (with --source), or a run config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (with a run config)")
    p.add_argument("--out", required=True, help="folder for the shards and labels.jsonl (must hold no shards)")
    p.add_argument("--shard-size", type=_count, help="samples per shard (default 1000)")
    p.add_argument("--max-size", type=_size, help="bytes per shard, e.g. 500MB (a shard closes once it holds that)")
    p.add_argument("--source", help="read TABLE as this data source (default: by its suffix, .csv or .parquet)")
    p.add_argument("--images", help="folder the table's image paths are relative to (default: the table's)")
    p.add_argument("--image-column", default="image", help="the table's column of image files (default image)")
    p.add_argument("--split", action="store_true", help="with a run config: train/, validation/ and test/ shards "
                   "by its split section")  # fmt: skip
    p.add_argument("--on-bad", choices=["error", "skip"], default="error", help="a bad image or label: stop, naming "
                   "it (default), or leave the row out")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_shard)
    return parser


def _warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"manyheads: warning: {message}", file=sys.stderr)


def _fail(error: BaseException, code: int) -> int:
    print(f"manyheads: error: {' '.join(str(error).split())}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 training failed, 2 bad input)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides may follow options: `train c.yaml --out x train.epochs=2`
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    shown = warnings.showwarning
    warnings.showwarning = _warning
    try:
        args.handler(args)
    except BrokenPipeError:  # `manyheads predict ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return _fail(KeyboardInterrupt("interrupted; continue a run with --resume --out RUN_DIR"), 130)
    except ModuleNotFoundError as error:
        return _fail(ImportError(f"{error.name} is not installed: pip install 'manyheads[export,serve]'"), 2)
    except ImportError as error:  # an optional package, named with the extra that installs it
        return _fail(error, 2)
    except FloatingPointError as error:
        return _fail(error, 1)
    except (ValueError, OSError) as error:
        return _fail(error, 2)
    finally:
        warnings.showwarning = shown
    return 0

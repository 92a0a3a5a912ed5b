"""CPU allocator: mh.fit under glibc's malloc defaults against manyheads' kept-memory settings.

The settings (``manyheads.allocator``) are process-wide and cannot be undone, so every call runs
in a fresh process: system, kept, system, kept, ... The image cache is built once beforehand.
Reported per contender: epoch seconds (median, the first epoch of each call discarded), minor
page faults and kernel CPU seconds per step, and the process's peak resident memory.

    python benchmarks/cpu_allocator.py --data ../shared/data/utkface --limit 1280
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import common
import overhead

import manyheads as mh
from manyheads import images
from manyheads.allocator import OPT_OUT

CONTENDERS = {
    "system": "glibc defaults (MANYHEADS_MALLOC=system)",
    "kept": "freed memory kept (mh.fit's default on CPU)",
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument("--data", default=str(common.DEFAULT_UTKFACE), help="UTKFace folder (file names carry labels)")
    parser.add_argument("--limit", type=int, default=None, help="evenly spaced images (default 1280)")
    parser.add_argument("--model", default=None, help="torchvision backbone name or cnn (default mobilenet_v2)")
    parser.add_argument("--size", type=int, default=None, help="image side in px (default 128)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 64)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per call, the first discarded (default 3)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions of the alternating round (default 3)")
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)  # internal: the parent's cache
    parser.add_argument("--probe", choices=sorted(CONTENDERS), help=argparse.SUPPRESS)  # internal: one call
    args = parser.parse_args(argv)
    tiny = dict(limit=24, model="cnn", size=16, batch=8, epochs=2, reps=1)
    full = dict(limit=1280, model="mobilenet_v2", size=128, batch=64, epochs=3, reps=3)
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: the first epoch of every call is discarded as warm-up")
    if not Path(args.data).is_dir():
        parser.error(f"UTKFace folder {args.data} not found; pass --data FOLDER")
    return args


def net(args: argparse.Namespace) -> mh.MultiHeadNet:
    if args.model == "cnn":
        trunk, _ = overhead.make_trunk("cnn", args.seed)
        return mh.MultiHeadNet(trunk, common.flagship_heads(), image_size=args.size)
    # a named backbone: channels-last, as users get
    return mh.MultiHeadNet(args.model, common.flagship_heads(), image_size=args.size)


def probe(args: argparse.Namespace) -> dict:
    """One mh.fit call in this (fresh) process; the parent chose the allocator through the environment."""
    df = mh.datasets.utkface(args.data, limit=args.limit)
    model = net(args)
    before = resource.getrusage(resource.RUSAGE_SELF)
    with common.PeakRSS() as peak:
        result = mh.fit(model, df, epochs=args.epochs, batch_size=args.batch, device="cpu", seed=args.seed,
                        cache_dir=args.cache_dir, workers=1, on_bad="skip", progress=False)  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "seconds": result.history["seconds"].tolist(),
        "steps": args.epochs * -(-len(df) // args.batch),
        "minflt": after.ru_minflt - before.ru_minflt,
        "sys_s": after.ru_stime - before.ru_stime,
        "peak_mib": (peak.peak_kib or float("nan")) / 1024,
    }


def call(argv: list[str], name: str, cache_dir: Path) -> dict:
    keep = common.child_argv(argv)
    env = dict(os.environ)
    env.pop(OPT_OUT, None)
    if name == "system":
        env[OPT_OUT] = "system"
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *keep, "--probe", name, "--cache-dir", str(cache_dir)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the {name} call failed:\n{done.stderr[-2000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("PROBE "))
    return json.loads(line.removeprefix("PROBE "))


def main(argv: list[str] | None = None) -> str:
    """Measure, print the Markdown section (append it with --write) and return it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.probe:
        print("PROBE " + json.dumps(probe(args)), flush=True)
        return ""
    if common.device_of(args.device).type != "cpu" and args.device != "auto":
        raise ValueError("this benchmark is about the CPU allocator: use --device cpu")
    df = mh.datasets.utkface(args.data, limit=args.limit)
    cache_dir = Path(tempfile.mkdtemp(prefix="mh-bench-alloc-"))
    try:
        images.build_cache(df["image"].tolist(), args.size, cache_dir=cache_dir, progress=False, on_bad="skip")
        runs = {name: [] for name in CONTENDERS}
        for rep in range(args.reps):
            for name in CONTENDERS:
                runs[name].append(call(argv, name, cache_dir))
                print(f"rep {rep + 1}/{args.reps} {name}: epochs {[round(s, 2) for s in runs[name][-1]['seconds']]} s "
                      f"faults {runs[name][-1]['minflt']}", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    epoch = {n: [s for r in runs[n] for s in r["seconds"][1:]] for n in CONTENDERS}
    base = common.median(epoch["system"])
    rows = []
    for n, label in CONTENDERS.items():
        med = common.median(epoch[n])
        rows.append([
            label, med, f"{common.fmt(min(epoch[n]))}-{common.fmt(max(epoch[n]))}", med / base,
            common.median([r["minflt"] / r["steps"] for r in runs[n]]),
            common.median([r["sys_s"] / r["steps"] for r in runs[n]]),
            common.median([r["peak_mib"] for r in runs[n]]),
        ])  # fmt: skip
    header = ["malloc", "s/epoch (median)", "range", "ratio to glibc defaults", "page faults/step",
              "kernel s/step", "peak RSS MiB"]  # fmt: skip
    notes = [
        f"mh.fit on {len(df)} UTKFace images from {args.data} (limit {args.limit}), {args.model} (random weights) at "
        f"{args.size} px, batch {args.batch}, fp32, default augmentation and training metrics, no validation; "
        f"{args.epochs} epochs per call, the first discarded; {args.reps} alternating repetitions, each call a "
        "fresh process; the image cache was built before the first call.",
        "Page faults and kernel seconds are the call's own (getrusage around mh.fit), per step including the "
        "discarded epoch; peak RSS is the process's high-water mark over the call (VmHWM).",
    ]
    title = "CPU allocator: glibc defaults vs freed memory kept"
    return common.publish(title, "cpu_allocator.py", argv, args, common.table(header, rows), notes)


if __name__ == "__main__":
    main()

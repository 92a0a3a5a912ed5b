"""Real data: UTKFace JPEGs from disk through ``mh.fit`` against the synthetic-tensor rate.

Times the one-off image cache build (decode + resize, a process pool of ``--workers``) on its
own, then epoch images/second of ``mh.fit`` on the cached UTKFace set with augmentation on
(and off), against the hand-written loop of overhead.py on random tensors of the same count,
model and batch, alternating in the same process.

    python benchmarks/real_data.py --data ../shared/data/utkface --limit 2000
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common
import overhead

import manyheads as mh
from manyheads import images


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument("--data", default=str(common.DEFAULT_UTKFACE), help="UTKFace folder (file names carry labels)")
    parser.add_argument("--limit", type=int, default=None, help="evenly spaced images (default 2000 CPU, 10000 GPU)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all CPUs)")
    parser.add_argument("--cache-dir", default=None, help="where the image cache goes (default: a temporary folder)")
    parser.add_argument(
        "--model", default=None, help="cnn or a torchvision name (default: cnn on CPU, resnet18 on GPU)"
    )
    parser.add_argument("--size", type=int, default=None, help="image side in px (default 64 on CPU, 128 on GPU)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 64 on CPU, 256 on GPU)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per call, the first discarded (default 3)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions of the alternating round (default 3)")
    parser.add_argument("--precision", choices=sorted(overhead.PRECISIONS), default=None, help="default bf16 on GPU")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default on GPU")
    args = parser.parse_args(argv)
    gpu = common.device_of(args.device).type == "cuda"
    if args.tiny:
        for key, value in dict(limit=24, workers=1, model="cnn", size=16, batch=8, epochs=2, reps=1).items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    args.limit = args.limit or (10000 if gpu else 2000)  # a GPU needs more steps per epoch to time
    args.model = args.model or ("resnet18" if gpu else "cnn")
    args.size = args.size or (128 if gpu else 64)
    args.batch = args.batch or (256 if gpu else 64)
    args.epochs = args.epochs or 3
    args.reps = args.reps or 3
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    args.channels_last = gpu if args.channels_last is None else args.channels_last
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: the first epoch of every call is discarded as warm-up")
    if not Path(args.data).is_dir():
        parser.error(f"UTKFace folder {args.data} not found; pass --data FOLDER")
    return args


def main(argv: list[str] | None = None) -> str:
    """Measure, print the Markdown section (append it with --write) and return it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    device = common.device_of(args.device)
    settings = overhead.Settings(args.model, args.size, args.batch, args.precision, args.channels_last)
    allocator_note = common.same_allocator(device)
    df = mh.datasets.utkface(args.data, limit=args.limit)
    n = len(df)
    cache_dir = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="mh-bench-cache-"))
    try:
        # ---- one-off: decode the JPEGs into the uint8 cache (cold), then reopen it (warm) --------
        before = set(cache_dir.glob("*.npy")) if cache_dir.is_dir() else set()
        t0 = time.perf_counter()
        cold = images.build_cache(df["image"].tolist(), args.size, cache_dir=cache_dir, workers=args.workers,
                                  progress=False, on_bad="skip")  # fmt: skip
        cold_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        images.build_cache(df["image"].tolist(), args.size, cache_dir=cache_dir, workers=args.workers, progress=False,
                           on_bad="skip")  # fmt: skip
        warm_s = time.perf_counter() - t0
        fresh_cache = bool(set(cache_dir.glob("*.npy")) - before)  # a cache reused from --cache-dir is no cold build

        # ---- alternating epochs: hand-written loop on random tensors, mh.fit on the JPEG cache -----
        synthetic = overhead.synthetic(n, args.size, args.seed)
        names = {
            "hand": "hand-written loop, random tensors in memory",
            "mh_aug": "mh.fit on UTKFace, augmentation on",
            "mh_plain": "mh.fit on UTKFace, augmentation off",
        }
        rates = {k: [] for k in names}
        setup = {k: [] for k in names}
        for rep in range(args.reps):
            for name in names:
                seed = args.seed + rep
                if name == "hand":
                    trunk, features = overhead.make_trunk(settings.model, seed)
                    t0 = common.clock(device)
                    seconds = overhead.hand_written(overhead.HandNet(trunk, features), synthetic, settings,
                                                    args.epochs, device)  # fmt: skip
                else:
                    net = overhead.mh_net(settings, seed)
                    t0 = common.clock(device)
                    kw = dict(cache_dir=cache_dir, workers=args.workers, on_bad="skip", train_metrics=False)
                    result = overhead.mh_fit(
                        net, df, settings, args.epochs, device, seed=seed, augment=name == "mh_aug", **kw
                    )
                    seconds = result.history["seconds"].tolist()
                wall = common.clock(device) - t0
                rates[name] += [len(cold.kept) / s if name != "hand" else n / s for s in seconds[1:]]
                setup[name].append(wall - sum(seconds))
                print(f"rep {rep + 1}/{args.reps} {name}: epochs {[round(s, 3) for s in seconds]} s", flush=True)
    finally:
        if args.cache_dir is None:
            shutil.rmtree(cache_dir, ignore_errors=True)

    base = common.median(rates["hand"])
    rows = [
        [label, common.median(rates[k]), f"{common.fmt(min(rates[k]))}-{common.fmt(max(rates[k]))}",
         common.median(rates[k]) / base, common.median(setup[k])]
        for k, label in names.items()
    ]  # fmt: skip
    header = ["contender", "images/s per epoch (median)", "range", "ratio to synthetic", "set-up s/call"]
    workers = args.workers if args.workers is not None else "all CPUs"
    cache_rows = [[n, len(cold.bad), workers, cold_s if fresh_cache else "n/a (cache reused)",
                   n / cold_s if fresh_cache else "n/a", warm_s]]  # fmt: skip
    cache_header = ["images", "unreadable", "workers", "cold build s", "images/s decoded", "warm reopen s"]
    body = (
        f"Image cache (JPEG decode + resize to {args.size} px, once):\n\n{common.table(cache_header, cache_rows)}\n\n"
        f"Training throughput:\n\n{common.table(header, rows)}"
    )
    notes = [
        f"{settings.describe()}; device {device}; {n} UTKFace images from {args.data} (limit {args.limit}) "
        f"and as many random uint8 images; {args.epochs} epochs per call, the first discarded; "
        f"{args.reps} alternating repetitions.",
        "mh.fit: no validation, train_metrics=False, the cache above memory-mapped (cache_dir); augmentation is "
        "mh's default Augment (crop, flip, jitter) on the training device. The hand-written loop does no "
        "augmentation. mh epoch time is history['seconds'].",
        "set-up s/call: the call's wall time minus its epochs (mh: opening the cache, encoding labels, optimizer).",
        allocator_note,
    ]
    return common.publish("Real data: UTKFace JPEGs vs synthetic tensors", "real_data.py", argv, args, body, notes)


if __name__ == "__main__":
    main()

"""Streaming throughput: WebDataset shards through ``mh.fit`` against the image cache, on the same images.

Shards the UTKFace images with manyheads' own writer (``manyheads shard``) into a temporary folder,
then trains the flagship net (MobileNetV2, untrained, 128 px, batch 64, augmentation on) for whole
epochs from the uint8 cache and from the shards (decoded by DataLoader workers), alternating, and
breaks down what limits the stream: reading the tar bytes alone, decoding alone (one process), the
workers' whole pipeline without training (read, decode, encode, hand over), and augmentation with
normalisation on the training device alone.

    python benchmarks/stream_throughput.py                  # 20k UTKFace images (generated if absent), 128 px
    python benchmarks/stream_throughput.py --quick          # seconds: 256 images at 32 px, a small CNN
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import common
import numpy as np
import torch
from PIL import Image

import manyheads as mh
from manyheads import images, shards, streams
from manyheads.datasets import UTKFACE_GENDERS, UTKFACE_RACES


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, tiny_help="the same as --quick")
    parser.add_argument("--quick", action="store_true", help="seconds: 256 images at 32 px, a small CNN, 1 worker")
    parser.add_argument("--data", default=str(common.DEFAULT_UTKFACE), help="UTKFace folder (generated if absent)")
    parser.add_argument("--limit", type=int, default=None, help="evenly spaced images (default 20000)")
    parser.add_argument("--size", type=int, default=None, help="image side in px (default 128)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 64)")
    parser.add_argument("--model", default=None, help="a torchvision backbone or cnn (default mobilenet_v2)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per contender, the first discarded (2)")
    parser.add_argument("--reps", type=int, default=1, help="alternating repetitions of the two contenders")
    parser.add_argument("--shard-size", type=int, default=None, help="samples per shard (default 1000)")
    parser.add_argument("--probe", type=int, default=None, help="samples the breakdown measures on (default 2000)")
    args = parser.parse_args(argv)
    args.quick = args.quick or args.tiny
    defaults = dict(limit=20000, size=128, batch=64, model="mobilenet_v2", workers=streams.default_workers(),
                    epochs=2, shard_size=1000, probe=2000)  # fmt: skip
    if args.quick:
        defaults |= dict(limit=256, size=32, batch=32, model="cnn", workers=1, shard_size=64, probe=256)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: the first epoch of every call is discarded as warm-up")
    return args


def faces(folder: Path, n: int, seed: int) -> Path:
    """``n`` generated 200 px JPEG files named as UTKFace names them (age_gender_race_date.jpg)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.integers(0, 256, (25, 25, 3), dtype=np.uint8)  # smooth: compresses like a photo, not noise
        pixels = np.asarray(Image.fromarray(base).resize((200, 200), Image.Resampling.BILINEAR))
        age, gender, race = rng.integers(1, 90), i % len(UTKFACE_GENDERS), i % len(UTKFACE_RACES)
        Image.fromarray(pixels).save(folder / f"{age}_{gender}_{race}_2017{i:010d}.jpg.chip.jpg", quality=90)
    return folder


def make_net(args: argparse.Namespace, seed: int) -> mh.MultiHeadNet:
    torch.manual_seed(seed)
    heads = common.flagship_heads()
    if args.model == "cnn":
        layers, channels = [], 3
        for out in (32, 64, 128):
            layers += [torch.nn.Conv2d(channels, out, 3, stride=2, padding=1), torch.nn.ReLU()]
            channels = out
        trunk = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        return mh.MultiHeadNet(trunk, heads, image_size=args.size)
    return mh.MultiHeadNet(args.model, heads, pretrained=False, image_size=args.size)


def train(args, data, device, seed: int, **options) -> list[float]:
    """Epoch seconds of one ``mh.fit`` call (flagship settings; no validation, no training metrics)."""
    result = mh.fit(make_net(args, seed), data, epochs=args.epochs, batch_size=args.batch, losses={"age": "mae"},
                    device=device, seed=seed, progress=False, train_metrics=False, workers=args.workers,
                    **options)  # fmt: skip
    return result.history["seconds"].tolist()


def breakdown(args, pattern: str, device: torch.device) -> dict[str, float]:
    """Samples/s of each stage of the stream alone, on the first ``--probe`` samples."""
    urls = shards.expand(pattern)
    rates = {}
    t0 = time.perf_counter()
    raw = list(islice(shards.raw_samples(urls), args.probe))
    rates["read"] = len(raw) / (time.perf_counter() - t0)
    rates["read_mb"] = sum(len(v) for r in raw for k, v in r.items() if not k.startswith("__")) / 1e6
    parsed = [shards.parse(r) for r in raw]
    t0 = time.perf_counter()
    for row in parsed:
        images.decode(row["image"], args.size, "probe")
    rates["decode"] = len(parsed) / (time.perf_counter() - t0)
    heads = make_net(args, 0).heads
    prepared = streams.prepare(streams.from_webdataset(pattern), None, heads, steps_per_epoch=max(1, len(raw) //
                               args.batch), image_size=args.size, workers=args.workers)  # fmt: skip
    batches = prepared.batches(args.batch, torch.device("cpu"), seed=0)
    t0 = time.perf_counter()
    n = sum(len(batch["keys"]) for batch in batches.collated(0))
    rates["pipeline"] = n / (time.perf_counter() - t0)
    x = torch.stack([torch.from_numpy(images.decode(r["image"], args.size, "probe")) for r in parsed[: args.batch]])
    x, augment, generator = x.to(device), images.Augment(), torch.Generator(device=device)
    steps = max(3, min(30, len(raw) // args.batch))
    common.sync(device)
    t0 = time.perf_counter()
    for step in range(steps):
        generator.manual_seed(step)
        images.normalize(augment(x, generator=generator))
    rates["augment"] = steps * args.batch / (common.clock(device) - t0)
    return rates


def main(argv: list[str] | None = None) -> str:
    """Measure, print the Markdown section (append it with --write) and return it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    device = common.device_of(args.device)
    allocator_note = common.same_allocator(device)
    temp = Path(tempfile.mkdtemp(prefix="mh-bench-stream-"))
    try:
        folder, generated = Path(args.data), not Path(args.data).is_dir()
        if generated:
            folder = faces(temp / "faces", args.limit, args.seed)
        df = mh.datasets.utkface(folder, limit=args.limit)
        n = len(df)
        t0 = time.perf_counter()
        written = shards.write_shards(df, temp / "shards", shard_size=args.shard_size)
        shard_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cache = images.build_cache(df["image"].tolist(), args.size, cache_dir=temp / "cache", workers=args.workers,
                                   progress=False, on_bad="skip")  # fmt: skip
        cache_s = time.perf_counter() - t0
        steps = max(1, n // args.batch)
        rates = {"cache": [], "stream": []}
        for rep in range(args.reps):
            seed = args.seed + rep
            seconds = train(args, df, device, seed, cache_dir=temp / "cache", on_bad="skip")
            rates["cache"] += [len(cache.kept) / s for s in seconds[1:]]
            print(f"rep {rep + 1}/{args.reps} cache: epochs {[round(s, 2) for s in seconds]} s", flush=True)
            seconds = train(args, written.pattern, device, seed, steps_per_epoch=steps)
            rates["stream"] += [steps * args.batch / s for s in seconds[1:]]
            print(f"rep {rep + 1}/{args.reps} stream: epochs {[round(s, 2) for s in seconds]} s", flush=True)
        parts = breakdown(args, written.pattern, device)
    finally:
        shutil.rmtree(temp, ignore_errors=True)

    cache_rate, stream_rate = common.median(rates["cache"]), common.median(rates["stream"])
    rows = [
        ["mh.fit from the uint8 cache (memory-mapped)", cache_rate, 1.0],
        [f"mh.fit from {len(written.shards)} shards, DataLoader workers: {args.workers}", stream_rate,
         stream_rate / cache_rate],
    ]  # fmt: skip
    stages = [
        ["read the tar bytes alone (1 process)", parts["read"], f"{parts['read_mb']:.1f} MB in {args.probe} samples"],
        [f"decode alone to {args.size} px (1 process)", parts["decode"], "images.decode, the cache's decoding"],
        [f"the workers' pipeline alone ({args.workers} worker(s))", parts["pipeline"], "read, decode, encode, pass"],
        ["augment + normalise on the device alone", parts["augment"], f"{device}, batch {args.batch}"],
        ["training steps alone (the cache contender)", cache_rate, args.model],
    ]  # fmt: skip
    limit = min(("the workers' decoding pipeline", parts["pipeline"]), ("the training steps", cache_rate),
                key=lambda item: item[1])  # fmt: skip
    body = (
        f"Training throughput (images/s per epoch, median of epochs after the first):\n\n"
        f"{common.table(['contender', 'images/s', 'ratio to cache'], rows)}\n\n"
        f"What each stage of the stream manages alone (samples/s):\n\n"
        f"{common.table(['stage', 'samples/s', 'note'], stages)}"
    )
    notes = [
        f"{n} {'generated' if generated else 'UTKFace'} images ({args.data if not generated else 'absent: generated'}"
        f"), {args.model} untrained at {args.size} px, batch {args.batch}, augmentation on (mh's default Augment), "
        f"no validation, train_metrics=False; {args.epochs} epochs per call, the first discarded; {args.reps} "
        f"alternating repetitions; device {device}.",
        f"One-off costs: sharding {shard_s:.1f} s ({n / shard_s:.0f} images/s, each file decoded once to check it, "
        f"{written.bytes / 1e6:.0f} MB in {len(written.shards)} shards of {args.shard_size}); the cache build "
        f"{cache_s:.1f} s ({args.workers} workers).",
        f"The stream's epoch is {steps} steps (one pass) and includes starting its DataLoader workers; the stream "
        f"here is limited by {limit[0]} ({limit[1]:.0f} samples/s alone).",
        allocator_note,
    ]
    return common.publish("Streaming: WebDataset shards vs the image cache", "stream_throughput.py", argv, args, body,
                          notes, extra=f"webdataset {shards.require().__version__}")  # fmt: skip


if __name__ == "__main__":
    main()

"""Streaming memory: a million generated samples through ``mh.fit`` for a fixed number of steps, in flat memory.

The samples (small images and three labels) are made on the fly by a torch IterableDataset and
never stored whole; ``mh.fit`` reads them as a stream (``steps_per_epoch``), decoding in DataLoader
workers. A thread samples the resident memory of the training process (and of its workers) over
the run; the section gives it at the start, its peak and at the end.

    python benchmarks/stream_memory.py                # 1,000,000 samples at 32 px, one pass of batch 64 steps
    python benchmarks/stream_memory.py --quick        # seconds: 200 steps at 16 px
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import common
import numpy as np
import torch
import torchmetrics  # noqa: F401  imported by the heads' metrics at the first epoch's end: before, not mid-run

import manyheads as mh
from manyheads import streams
from manyheads.datasets import UTKFACE_GENDERS, UTKFACE_RACES

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class Generated(torch.utils.data.IterableDataset):
    """``n`` RGB images of ``size`` px with age, gender and race labels (some missing), made as they are read."""

    def __init__(self, n: int, size: int, seed: int = 0) -> None:
        self.n, self.size, self.seed = n, size, seed

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        for i in range(self.n):
            image = rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)
            yield {"image": image, "age": float(image[..., 0].mean()) if i % 5 else None,
                   "gender": UTKFACE_GENDERS[i % 2], "race": UTKFACE_RACES[i % 5] if i % 7 else None}  # fmt: skip


def rss_mib(pid: int | str = "self") -> float:
    """Resident memory of a process in MiB (Linux /proc), NaN when it cannot be read."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def children() -> list[int]:
    """This process's child processes (the DataLoader workers), from /proc."""
    found = []
    for task in Path("/proc/self/task").glob("*/children"):
        try:
            found += [int(pid) for pid in task.read_text().split()]
        except OSError:
            pass
    return found


class Sampler(threading.Thread):
    """Samples the resident memory of this process and its children every ``every`` seconds."""

    def __init__(self, every: float) -> None:
        super().__init__(daemon=True)
        self.every, self.done = every, threading.Event()
        self.main: list[tuple[float, float]] = []  # (seconds, MiB)
        self.workers: list[float] = []  # MiB of all children together

    def run(self) -> None:
        t0 = time.perf_counter()
        while not self.done.is_set():
            self.main.append((time.perf_counter() - t0, rss_mib()))
            self.workers.append(sum(rss_mib(pid) for pid in children()))
            self.done.wait(self.every)

    def stop(self) -> None:
        self.done.set()
        self.join()


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, tiny_help="the same as --quick")
    parser.add_argument("--quick", action="store_true", help="seconds: 200 steps at 16 px, 1 worker")
    parser.add_argument("--samples", type=int, default=1_000_000, help="samples the stream holds (default 1e6)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: one pass, samples // batch)")
    parser.add_argument("--size", type=int, default=None, help="image side in px (default 32)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 64)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: all cores)")
    parser.add_argument("--every", type=float, default=0.5, help="seconds between memory samples")
    args = parser.parse_args(argv)
    args.quick = args.quick or args.tiny
    defaults = dict(size=32, batch=64, workers=streams.default_workers())
    if args.quick:
        defaults |= dict(size=16, batch=32, workers=1, steps=200)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.steps = args.steps or max(1, args.samples // args.batch)
    return args


def main(argv: list[str] | None = None) -> str:
    """Measure, print the Markdown section (append it with --write) and return it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    device = common.device_of(args.device)
    torch.manual_seed(args.seed)
    layers, channels = [], 3
    for out in (16, 32):
        layers += [torch.nn.Conv2d(channels, out, 3, stride=2, padding=1), torch.nn.ReLU()]
        channels = out
    trunk = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    heads = common.flagship_heads()
    net = mh.MultiHeadNet(trunk, heads, image_size=args.size)
    stream = Generated(args.samples, args.size, args.seed)
    sampler = Sampler(args.every)
    sampler.start()
    t0 = time.perf_counter()
    try:
        result = mh.fit(net, stream, steps_per_epoch=args.steps, epochs=1, batch_size=args.batch, device=device,
                        workers=args.workers, seed=args.seed, progress=False)  # fmt: skip
    finally:
        sampler.stop()
    wall = time.perf_counter() - t0
    main_rss = [mib for _, mib in sampler.main]
    start, peak, end = main_rss[0], max(main_rss), main_rss[-1]
    settled = main_rss[len(main_rss) // 10]  # a tenth into the run: the first batches' buffers are there
    workers_peak = max(sampler.workers) if sampler.workers else 0.0
    seen = int(result.history["train/gender/labels"].iloc[0])
    rows = [["training process", start, settled, peak, end, peak - start, end - settled],
            [f"its DataLoader workers ({args.workers}), together", "", "", workers_peak, "", "", ""]]  # fmt: skip
    header = ["process", "start", "at 10 %", "peak", "end", "peak - start", "end - at 10 %"]
    body = (f"Resident memory (MiB) over {args.steps} steps of {args.batch} ({seen} samples of a stream of "
            f"{args.samples}):\n\n{common.table(header, rows)}")  # fmt: skip
    notes = [
        f"A torch IterableDataset makes {args.samples} samples of {args.size} px on the fly (never stored); a small "
        f"CNN (two strided convs), three heads (age, gender, race, partial labels), DataLoader workers: "
        f"{args.workers}, device {device}; {wall:.1f} s wall, {seen / result.history['seconds'].iloc[0]:.0f} "
        "samples/s.",
        f"Sampled every {args.every} s from /proc/PID/statm ({len(main_rss)} samples); start is the first sample, "
        "just before mh.fit reads the stream's first 5000 samples for the targets' statistics. A worker's resident "
        "memory counts the pages it shares with the training process (forked).",
    ]
    return common.publish("Streaming memory: a million generated samples", "stream_memory.py", argv, args, body,
                          notes)  # fmt: skip


if __name__ == "__main__":
    main()

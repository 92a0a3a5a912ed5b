"""Overhead of ``mh.fit`` against a hand-written PyTorch loop doing the same work, step for step.

Same model (a small CNN on CPU, torchvision resnet18 with bf16 autocast and channels_last on
GPU), three heads (age L1 on standardized targets, gender BCE, race 5-class CE, masked means
summed), the same uint8 images already in memory, same batch size, AdamW, precision and
number of steps; no validation, no augmentation. Contenders run alternately in one process.

    python benchmarks/overhead.py            # full run (minutes)
    python benchmarks/overhead.py --tiny     # seconds: checks the script runs
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import common
import torch
import torch.nn.functional as F
from torch import nn

import manyheads as mh
from manyheads.datasets import UTKFACE_RACES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---- what both contenders train on ----------------------------------------------------------


@dataclass
class Settings:
    """Model and loop shape shared by every contender."""

    model: str
    size: int
    batch: int
    precision: str
    channels_last: bool
    compile: bool = False
    lr: float = 1e-3

    def describe(self) -> str:
        return (
            f"model {self.model} at {self.size} px, batch {self.batch}, AdamW lr {self.lr:g}, "
            f"precision {self.precision}, channels_last {self.channels_last}, compile {self.compile}"
        )


@dataclass
class Synthetic:
    """Random uint8 images [N, 3, S, S] and labels for the three heads (all rows labelled)."""

    images: torch.Tensor
    age: torch.Tensor  # float years
    gender: torch.Tensor  # float 0/1
    race: torch.Tensor  # int64 0..4

    def __len__(self) -> int:
        return self.images.shape[0]

    def table(self) -> dict:
        """The same data as a table for ``mh.fit`` (an image column of uint8 arrays and label columns)."""
        return {"image": self.images, "age": self.age, "gender": self.gender, "race": self.race}


def synthetic(n: int, size: int, seed: int = 0) -> Synthetic:
    """``n`` random images at ``size`` px with random ages 1-90, genders and races."""
    g = torch.Generator().manual_seed(seed)
    return Synthetic(
        images=torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
        age=torch.randint(1, 91, (n,), generator=g).float(),
        gender=torch.randint(0, 2, (n,), generator=g).float(),
        race=torch.randint(0, len(UTKFACE_RACES), (n,), generator=g),
    )


LOSSES = {"age": "mae"}  # gender and race keep their defaults, BCE and cross-entropy


def small_cnn() -> tuple[nn.Module, int]:
    """A small CNN trunk (about 0.1M parameters): three strided conv blocks and global pooling."""
    layers, channels = [], 3
    for out in (32, 64, 128):
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
        channels = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), channels


def make_trunk(name: str, seed: int) -> tuple[nn.Module, int]:
    """``"cnn"`` (the small CNN) or a torchvision backbone name, seeded, untrained."""
    torch.manual_seed(seed)
    if name == "cnn":
        return small_cnn()
    from manyheads import backbones

    return backbones.create(name, pretrained=False)


# ---- contender 1: the hand-written loop ------------------------------------------------------


class HandNet(nn.Module):
    """Trunk plus three linear heads, written out by hand."""

    def __init__(self, trunk: nn.Module, features: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.age, self.gender, self.race = nn.Linear(features, 1), nn.Linear(features, 1), nn.Linear(features, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.age(h).squeeze(-1), self.gender(h).squeeze(-1), self.race(h)


def masked_mean(per_sample: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    mask = labelled.to(per_sample.dtype)
    return (per_sample * mask).sum() / mask.sum().clamp(min=1e-12)


def hand_written(model: HandNet, data: Synthetic, settings: Settings, epochs: int, device: torch.device) -> list[float]:
    """Train ``epochs`` epochs with a plain PyTorch loop; returns each epoch's wall seconds.

    Per step: index the uint8 images, convert and normalise on the device, forward under
    autocast, three masked-mean losses summed, backward, AdamW step. The epoch loss is
    accumulated on the device and read once per epoch (one host sync per epoch, as mh.fit).
    """
    model.to(device).train()
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if settings.compile else model
    images = data.images.to(device)
    age, gender, race = data.age.to(device), data.gender.to(device), data.race.to(device)
    age_l = gender_l = race_l = torch.ones(len(data), dtype=torch.bool, device=device)  # all labelled
    center, scale = age[age_l].mean(), age[age_l].std()
    age_z = (age - center) / scale  # the age head learns standardized targets, as mh's does
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    dtype = PRECISIONS[settings.precision]
    scaler = torch.amp.GradScaler("cuda") if settings.precision == "fp16" and device.type == "cuda" else None
    n, b = len(data), settings.batch
    seconds = []
    for _ in range(epochs):
        t0 = common.clock(device)
        order = torch.randperm(n, device=device)
        running = torch.zeros((), device=device)
        for step in range(math.ceil(n / b)):
            rows = order[step * b : (step + 1) * b]
            x = (images[rows].float().div(255) - mean) / std
            if settings.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
                age_out, gender_out, race_out = step_model(x)
            age_loss = (age_out.float() - age_z[rows]).abs()
            gender_loss = F.binary_cross_entropy_with_logits(gender_out.float(), gender[rows], reduction="none")
            race_loss = F.cross_entropy(race_out.float(), race[rows], reduction="none")
            loss = (
                masked_mean(age_loss, age_l[rows])
                + masked_mean(gender_loss, gender_l[rows])
                + masked_mean(race_loss, race_l[rows])
            )
            opt.zero_grad(set_to_none=True)
            if scaler:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            running += loss.detach()
        float(running)
        seconds.append(common.clock(device) - t0)
    return seconds


# ---- contender 2: mh.fit ----------------------------------------------------------------------


def mh_net(settings: Settings, seed: int) -> mh.MultiHeadNet:
    trunk, _ = make_trunk(settings.model, seed)
    return mh.MultiHeadNet(trunk, common.flagship_heads(), image_size=settings.size)


def mh_fit(
    net: mh.MultiHeadNet,
    table,
    settings: Settings,
    epochs: int,
    device: torch.device,
    *,
    seed: int,
    augment: bool = False,
    **kw,
) -> mh.TrainResult:
    """``mh.fit`` with the loop's settings: no validation, no progress bar, no augmentation by default."""
    return mh.fit(
        net, table, losses=LOSSES, epochs=epochs, batch_size=settings.batch, lr=settings.lr, augment=augment,
        image_size=settings.size, precision=settings.precision, channels_last=settings.channels_last,
        compile=settings.compile, device=device, seed=seed, progress=False, **kw,
    )  # fmt: skip


# ---- measurement -------------------------------------------------------------------------------

CONTENDERS = {
    "hand": "hand-written PyTorch loop",
    "mh": "mh.fit(train_metrics=False)",
    "mh_metrics": "mh.fit (default train_metrics=True)",
}


def run_once(name: str, data: Synthetic, settings: Settings, epochs: int, device: torch.device, seed: int) -> dict:
    """One call of one contender: epoch seconds, the call's wall time, GPU peak memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if name == "hand":
        trunk, features = make_trunk(settings.model, seed)
        model = HandNet(trunk, features)
        t0 = common.clock(device)
        seconds = hand_written(model, data, settings, epochs, device)
    else:
        net = mh_net(settings, seed)
        t0 = common.clock(device)
        result = mh_fit(net, data.table(), settings, epochs, device, seed=seed, train_metrics=name == "mh_metrics")
        seconds = result.history["seconds"].tolist()
    wall = common.clock(device) - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"seconds": seconds, "wall": wall, "peak_mib": peak}


def probe(name: str, data: Synthetic, settings: Settings, epochs: int, device: torch.device, seed: int) -> dict:
    """Peak-RSS growth of this (fresh) process across one call of ``name``: data and model exist before."""
    trunk, features = make_trunk(settings.model, seed)
    heads = common.flagship_heads()
    model = HandNet(trunk, features) if name == "hand" else mh.MultiHeadNet(trunk, heads, image_size=settings.size)
    import torchmetrics.functional.classification  # noqa: F401  a one-time import, not training memory

    gc.collect()
    with common.PeakRSS() as peak:
        if name == "hand":
            hand_written(model, data, settings, epochs, device)
        else:
            mh_fit(model, data.table(), settings, epochs, device, seed=seed, train_metrics=name == "mh_metrics")
    return {"name": name, "rss_growth_mib": peak.growth_mib}


def tensor_peak(name: str, data: Synthetic, settings: Settings, epochs: int, device: torch.device, seed: int) -> float:
    """Peak live CPU tensor memory (MiB) of one call of ``name``; model and data are built before."""
    trunk, features = make_trunk(settings.model, seed)
    if name == "hand":
        model = HandNet(trunk, features)
        return common.peak_tensor_mib(lambda: hand_written(model, data, settings, epochs, device))
    net = mh.MultiHeadNet(trunk, common.flagship_heads(), image_size=settings.size)
    metrics = name == "mh_metrics"
    return common.peak_tensor_mib(
        lambda: mh_fit(net, data.table(), settings, epochs, device, seed=seed, train_metrics=metrics)
    )


def cpu_memory(argv: list[str], names: list[str], reps: int) -> dict[str, list[float]]:
    """Run :func:`probe` ``reps`` times per contender, alternating, each in a fresh process; MiB of peak-RSS growth.

    The children use one malloc arena (MALLOC_ARENA_MAX=1), one source of scatter fewer; growth still
    moves by 10-20 MiB between identical calls, hence repetitions and a median.
    """
    keep = common.child_argv(argv)
    env = {**os.environ, "MALLOC_ARENA_MAX": "1"}
    out: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(reps):
        for name in names:
            done = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), *keep, "--probe", name],
                capture_output=True, text=True, check=True, env=env,
            )  # fmt: skip
            line = next(line for line in done.stdout.splitlines() if line.startswith("PROBE "))
            out[name].append(json.loads(line[len("PROBE ") :])["rss_growth_mib"])
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument(
        "--model", default=None, help="cnn (small CNN) or a torchvision name (default: cnn on CPU, resnet18 on GPU)"
    )
    parser.add_argument("--size", type=int, default=None, help="image side in px (default 64 on CPU, 128 on GPU)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 64 on CPU, 256 on GPU)")
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch (default 20 on CPU, 50 on GPU)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per call, the first discarded (default 3)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions of the alternating round (default 5)")
    parser.add_argument(
        "--precision", choices=sorted(PRECISIONS), default=None, help="default fp32 on CPU, bf16 on GPU"
    )
    parser.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default on for GPU"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CPU: measure peak-RSS growth in a fresh process per contender (default on unless --tiny)",
    )
    parser.add_argument("--memory-reps", type=int, default=5, help="CPU memory probes per contender (median)")
    parser.add_argument("--probe", choices=sorted(CONTENDERS), help=argparse.SUPPRESS)  # internal: one memory probe
    args = parser.parse_args(argv)
    gpu = common.device_of(args.device).type == "cuda"
    if args.tiny:
        defaults = dict(model="cnn", size=16, batch=8, steps=3, epochs=2, reps=1)
        for key, value in defaults.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    args.model = args.model or ("resnet18" if gpu else "cnn")
    args.size = args.size or (128 if gpu else 64)
    args.batch = args.batch or (256 if gpu else 64)
    args.steps = args.steps or (50 if gpu else 20)
    args.epochs = args.epochs or 3
    args.reps = args.reps or 5
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    args.channels_last = gpu if args.channels_last is None else args.channels_last
    args.memory = (not args.tiny and not gpu) if args.memory is None else args.memory
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: the first epoch of every call is discarded as warm-up")
    return args


def main(argv: list[str] | None = None) -> str:
    """Run the comparison, print the Markdown section (and append it with --write); returns it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    device = common.device_of(args.device)
    settings = Settings(args.model, args.size, args.batch, args.precision, args.channels_last, args.compile)
    allocator_note = common.same_allocator(device)
    data = synthetic(args.steps * args.batch, args.size, args.seed)
    if args.probe:
        print("PROBE " + json.dumps(probe(args.probe, data, settings, args.epochs, device, args.seed)), flush=True)
        return ""

    names = list(CONTENDERS)
    runs = {name: [] for name in names}
    for rep in range(args.reps):  # alternate: hand, mh, mh_metrics, hand, mh, ...
        for name in names:
            runs[name].append(run_once(name, data, settings, args.epochs, device, args.seed + rep))
            print(
                f"rep {rep + 1}/{args.reps} {name}: epochs {[round(s, 3) for s in runs[name][-1]['seconds']]} s",
                flush=True,
            )

    per_step = {n: [s / args.steps * 1000 for r in runs[n] for s in r["seconds"][1:]] for n in names}
    setup = {n: [r["wall"] - sum(r["seconds"]) for r in runs[n]] for n in names}
    if device.type == "cuda":
        memory = {n: common.median([r["peak_mib"] for r in runs[n]]) for n in names}
        memory_note = "Peak memory: torch.cuda.max_memory_allocated over one call, data on the GPU included."
        rss = {n: float("nan") for n in names}
    elif args.memory:
        memory = {n: tensor_peak(n, data, settings, args.epochs, device, args.seed) for n in names}
        probes = cpu_memory(argv, names, args.memory_reps)
        rss = {n: common.median(probes[n]) for n in names}
        spreads = "; ".join(f"{n} {common.fmt(min(v))}-{common.fmt(max(v))}" for n, v in probes.items())
        memory_note = (
            "Peak memory (CPU): the most CPU tensor memory live at once during one call, from the torch profiler's "
            "allocation events (common.peak_tensor_mib; the CPU counterpart of torch.cuda.max_memory_allocated, "
            "data and model built before the call are not counted). RSS growth: peak resident memory of a fresh "
            "process during one call above what it held before (VmHWM reset through /proc/self/clear_refs), after "
            "data, model and torchmetrics were loaded; median of "
            f"{args.memory_reps} alternating probes per contender, one malloc arena (ranges, MiB: {spreads}). "
            "It adds what malloc, oneDNN and the threads keep, and moves by 10-20 MiB between identical calls."
        )
    else:
        memory = rss = {n: float("nan") for n in names}
        memory_note = "Memory not measured (CPU without --memory)."
    base = common.median(per_step["hand"])
    rows = []
    for n in names:
        ms = common.median(per_step[n])
        spread = f"{common.fmt(min(per_step[n]))}-{common.fmt(max(per_step[n]))}" if per_step[n] else "n/a"
        rows.append([
            CONTENDERS[n], ms, spread, 1000 / ms * args.batch, ms / base, common.median(setup[n]),
            memory[n], memory[n] / memory["hand"] if memory["hand"] > 0 else float("nan"), rss[n],
        ])  # fmt: skip
    header = ["contender", "ms/step (median)", "range", "images/s", "ratio to hand-written",
              "set-up s/call", "peak memory MiB", "memory ratio", "RSS growth MiB (CPU)"]  # fmt: skip
    notes = [
        f"{settings.describe()}; device {device}; {args.steps} steps/epoch on {len(data)} random uint8 images; "
        f"{args.epochs} epochs per call, the first discarded; {args.reps} alternating repetitions; "
        f"{len(per_step['hand'])} epochs timed per contender.",
        "Both sides: images index a uint8 tensor in memory (on the GPU when there is one), are converted and "
        "ImageNet-normalised per batch; age L1 on standardized targets + gender BCE + race CE, masked means summed.",
        "mh epoch time is history['seconds'] (the epoch's wall time, ended by its one host sync); set-up s/call is "
        "the call's wall time minus its epochs (mh: encoding, optimizer, best-state copies; hand: data to device).",
        memory_note,
        allocator_note,
    ]
    title = "Training overhead: mh.fit vs a hand-written loop"
    return common.publish(title, "overhead.py", argv, args, common.table(header, rows), notes)


if __name__ == "__main__":
    main()

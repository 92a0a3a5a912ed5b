"""Augmentation speed: per-batch augmentation now and at an earlier revision, and its share of a training step.

Training augments every batch on the training device (``manyheads.images.Augment``, then
``normalize``), in series with the step. This times augment + normalise for a uint8 batch at
the training size with ``examples/utkface.yaml``'s options and with ``Augment()``'s defaults,
for the current code and for ``src/manyheads/images/augment.py`` as it was at ``--against``
(read with ``git show``), alternating, medians. A training step of the flagship's net
(MobileNetV2, three heads, forward, backward and AdamW, channels-last) gives the share.

    python benchmarks/augment_speed.py                     # CPU, batch 64 at 128 px
    python benchmarks/augment_speed.py --against 01aef67 --write
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import common
import torch

import manyheads as mh
from manyheads import images
from manyheads.config import load_config

MODULE = "src/manyheads/images/augment.py"
BEFORE = "01aef67"  # the last commit before augmentation worked on the chosen samples only
RECIPE = common.ROOT / "examples" / "utkface.yaml"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, tiny_help="batch 4 at 32 px, MobileNetV3-small, 2 repetitions")
    parser.add_argument("--against", default=BEFORE, help=f"git revision of the earlier {MODULE} (default {BEFORE})")
    parser.add_argument("--size", type=int, default=None, help="image side in px (default 128)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 64)")
    parser.add_argument("--reps", type=int, default=None, help="alternating rounds (default 15)")
    args = parser.parse_args(argv)
    defaults = dict(size=32, batch=4, reps=2) if args.tiny else dict(size=128, batch=64, reps=15)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def earlier_module(revision: str):
    """The augment module as it was at ``revision``, imported under its own name; None without git or that file."""
    try:
        source = subprocess.run(["git", "show", f"{revision}:{MODULE}"], cwd=common.ROOT, capture_output=True,
                                text=True, check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "augment_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("augment_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


def recipe_options() -> dict:
    """The committed recipe's augmentation options, as fit receives them."""
    return dataclasses.asdict(load_config(RECIPE).fit_kwargs()["augment"])


def step_seconds(size: int, batch: int, tiny: bool, device: torch.device, reps: int) -> float:
    """Median seconds of one training step of the flagship's three-head net on a normalised batch."""
    heads = common.flagship_heads()
    torch.manual_seed(0)
    backbone = "mobilenet_v3_small" if tiny else "mobilenet_v2"
    net = mh.MultiHeadNet(backbone, heads, image_size=size, pretrained=False).to(device)
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    net(x)  # materialises lazy head layers before the optimizer sees the parameters
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step() -> None:
        loss = sum(out.float().pow(2).mean() for out in net(x).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return _median_seconds(step, device, reps)


def _median_seconds(run, device: torch.device, reps: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(reps):
        start = common.clock(device)
        run()
        times.append(common.clock(device) - start)
    return common.median(times)


def main(argv: list[str] | None = None) -> str:
    """Measure, print the Markdown section (append it with --write) and return it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    device = common.device_of(args.device)
    before = earlier_module(args.against)
    generator = torch.Generator(device=device)
    batch = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8).to(device)
    seconds = {}  # options -> (before, current), median seconds per batch
    for name, options in (("recipe (examples/utkface.yaml)", recipe_options()), ("defaults (Augment())", {})):
        contenders = {"current": (images.Augment(**options), images.normalize)}
        if before is not None:
            contenders["before"] = (before.Augment(**options), before.normalize)
        times = {key: [] for key in contenders}
        for rep in range(args.reps + 1):  # alternating; round 0 is warm-up
            for key, (augment, normalize) in contenders.items():
                generator.manual_seed(rep)
                start = common.clock(device)
                normalize(augment(batch, generator))
                if rep:
                    times[key].append(common.clock(device) - start)
        then = common.median(times["before"]) if before is not None else float("nan")
        seconds[name] = (then, common.median(times["current"]))
    step = step_seconds(args.size, args.batch, args.tiny, device, max(3, args.reps // 3))
    rows = [[name, 1000 * then, 1000 * now, now / then, 100 * then / (then + step), 100 * now / (now + step)]
            for name, (then, now) in seconds.items()]  # fmt: skip
    header = ["options", f"before ({args.against}), ms", "current, ms", "ratio", "share of a step before, %"]
    body = common.table([*header, "share now, %"], rows)
    notes = [
        f"augment + normalize of one uint8 batch of {args.batch} at {args.size} px, median of {args.reps} "
        f"alternating rounds; a training step of the three-head net: {1000 * step:.0f} ms (median)",
        "share: augmentation / (augmentation + step), the part of a training step spent augmenting",
    ]
    if before is None:
        notes.append(f"no earlier module: `git show {args.against}:{MODULE}` failed (not a git checkout?)")
    return common.publish("Augmentation speed: per-batch augmentation before and after", "augment_speed.py", argv,
                          args, body, notes)  # fmt: skip


if __name__ == "__main__":
    main()

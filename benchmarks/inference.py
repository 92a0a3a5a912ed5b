"""Inference: one three-head forward pass against three single-head networks of the same backbone.

Separate-model tools run one network per target; a multi-head net runs the trunk once. Both
sides are ``mh.MultiHeadNet`` on the same backbone (eval mode, ``torch.inference_mode``) fed
the same normalised float batch; images/second at batch 1 and 256, alternating, medians.

    python benchmarks/inference.py                  # CPU: mobilenet_v2 at 128 px
    python benchmarks/inference.py --backbones mobilenet_v2,resnet18
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import common
import torch

import manyheads as mh

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument(
        "--backbones", default=None, help="comma-separated (default mobilenet_v2; on GPU also resnet18)"
    )
    parser.add_argument("--size", type=int, default=None, help="image side in px (default 128)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,256)")
    parser.add_argument(
        "--iters",
        type=int,
        default=None,
        help="passes per timing (default: max(2, 64 // batch) CPU, max(10, 512 // batch) GPU)",
    )
    parser.add_argument("--reps", type=int, default=None, help="alternating repetitions (default 5)")
    parser.add_argument(
        "--precision", choices=sorted(PRECISIONS), default=None, help="default fp32 on CPU, bf16 on GPU"
    )
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default on GPU")
    args = parser.parse_args(argv)
    gpu = common.device_of(args.device).type == "cuda"
    if args.tiny:
        for key, value in dict(backbones="mobilenet_v2", size=32, batches="1,4", iters=2, reps=1).items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    args.backbones = (args.backbones or ("mobilenet_v2,resnet18" if gpu else "mobilenet_v2")).split(",")
    args.size = args.size or 128
    args.batches = [int(b) for b in (args.batches or "1,256").split(",")]
    args.reps = args.reps or 5
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    args.channels_last = gpu if args.channels_last is None else args.channels_last
    return args


def prepare(net: mh.MultiHeadNet, device: torch.device, channels_last: bool) -> mh.MultiHeadNet:
    net = net.to(device).eval()
    return net.to(memory_format=torch.channels_last) if channels_last else net


def images_per_second(nets: list, x: torch.Tensor, iters: int, autocast, device: torch.device) -> float:
    """Run every net in ``nets`` on ``x``, ``iters`` times; images of ``x`` per second of wall time."""
    with torch.inference_mode(), autocast():
        t0 = common.clock(device)
        for _ in range(iters):
            for net in nets:
                net(x)
        seconds = common.clock(device) - t0
    return x.shape[0] * iters / seconds


def main(argv: list[str] | None = None) -> str:
    """Measure, print the Markdown section (append it with --write) and return it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    device = common.device_of(args.device)
    dtype = PRECISIONS[args.precision]

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    rows = []
    for backbone in args.backbones:
        torch.manual_seed(args.seed)
        heads = common.flagship_heads()
        multi = prepare(mh.MultiHeadNet(backbone, heads, image_size=args.size), device, args.channels_last)
        singles = [
            prepare(mh.MultiHeadNet(backbone, {name: head}, image_size=args.size), device, args.channels_last)
            for name, head in common.flagship_heads().items()
        ]
        for batch in args.batches:
            iters = args.iters or (max(10, 512 // batch) if device.type == "cuda" else max(2, 64 // batch))
            x = torch.randn(batch, 3, args.size, args.size, device=device)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for nets in ([multi], singles):  # warm-up: allocator, cuDNN algorithm choice, lazy kernels
                images_per_second(nets, x, 1, autocast, device)
            rates = {"multi": [], "singles": []}
            for _ in range(args.reps):
                rates["multi"].append(images_per_second([multi], x, iters, autocast, device))
                rates["singles"].append(images_per_second(singles, x, iters, autocast, device))
            m, s = common.median(rates["multi"]), common.median(rates["singles"])
            rows.append([backbone, batch, m, s, m / s, 1000 * batch / m, 1000 * batch / s])
            print(f"{backbone} batch {batch}: multi {m:.1f} img/s, three singles {s:.1f} img/s", flush=True)
        del multi, singles
    header = ["backbone", "batch", "one 3-head net img/s", "three 1-head nets img/s", "speed-up",
              "ms/batch (3-head)", "ms/batch (3 nets)"]  # fmt: skip
    notes = [
        f"{args.size} px, precision {args.precision}, channels_last {args.channels_last}, device {device}; "
        f"eval mode under torch.inference_mode; {args.reps} alternating repetitions, medians; one warm-up pass each.",
        "One 3-head net: mh.MultiHeadNet(backbone, {age, gender, race}); three nets: mh.MultiHeadNet(backbone, {head}) "
        "per head, run one after another on the same batch (what one-model-per-target tools do). Inputs are "
        "already-normalised random float tensors on the device: decoding and preprocessing are not timed.",
    ]
    title = "Inference: one multi-head net vs one net per head"
    return common.publish(title, "inference.py", argv, args, common.table(header, rows), notes)


if __name__ == "__main__":
    main()

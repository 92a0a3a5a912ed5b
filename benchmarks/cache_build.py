"""Image cache build under torchrun: one decode per machine (split) against every process decoding all (before).

Launches ``torchrun --standalone --nproc_per_node=N`` on this script (``--child``) once per way
of building and round, each into a fresh cache folder, the ways alternating in order round by
round: ``split`` (the default now: local rank r decodes rows r::N into one shared file, its pool
taking 1/N of the CPUs), ``each`` (every process decodes every image: the behaviour before, kept
as ``MANYHEADS_CACHE_BUILD=each``) and ``main`` (local rank 0 decodes, the others wait). Reports
the median build time (from a barrier all processes passed to the last one's memory-mapped
cache), the median wall time of the whole launch (interpreter and torch start-up included) and
the decodes summed over the processes.

    python benchmarks/cache_build.py --data ../shared/data/utkface --size 128 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np

WAYS = {
    "split": "split (new): local ranks decode rows r::N into one file",
    "each": "each (before): every process decodes every image",
    "main": "main: local rank 0 decodes, the others wait",
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(common.DEFAULT_UTKFACE), help="a folder of JPEGs (default UTKFace)")
    parser.add_argument("--limit", type=int, default=None, help="evenly spaced images (default all; --quick 300)")
    parser.add_argument("--size", type=int, default=128, help="image side in px")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun --nproc_per_node")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3; --quick 2)")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, of {', '.join(WAYS)}")
    parser.add_argument("--workers", type=int, default=None, help="decoding pool per process (default: the library's)")
    parser.add_argument("--quick", action="store_true", help="300 images, 2 rounds: checks the script runs")
    parser.add_argument("--write", action="store_true", help="append the results to BENCHMARKS.md")
    parser.add_argument("--output", default=None, help="file --write appends to (default BENCHMARKS.md)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # a launched process: its JSON folder
    parser.add_argument("--list", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.limit = args.limit or (300 if args.quick else None)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.ways = args.ways.split(",")
    if unknown := set(args.ways) - set(WAYS):
        parser.error(f"--ways: unknown {', '.join(sorted(unknown))}; choose from {', '.join(WAYS)}")
    return args


def child(args: argparse.Namespace) -> None:
    """One launched process: build the cache, write its seconds and decodes."""
    import torch.distributed as dist

    from manyheads import images

    paths = Path(args.list).read_text().splitlines()
    dist.init_process_group("gloo")  # as under mh.fit; and one start for every process's clock
    dist.barrier()
    started = time.perf_counter()
    cache = images.build_cache(paths, args.size, cache_dir=args.cache_dir, workers=args.workers, progress=False,
                               on_bad="skip")  # fmt: skip
    seconds = time.perf_counter() - started
    record = {"seconds": seconds, "decoded": cache.decoded, "rows": len(cache.kept)}
    Path(args.child, f"rank{os.environ.get('LOCAL_RANK', '0')}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def pictures(args: argparse.Namespace, work: Path) -> tuple[list[str], str]:
    """The JPEGs to decode (evenly spaced from --data), or generated 200x200 ones when it is absent."""
    found = sorted(str(p) for p in Path(args.data).glob("*.jpg")) if Path(args.data).is_dir() else []
    if found:
        limit = args.limit or len(found)
        chosen = [found[i] for i in np.linspace(0, len(found) - 1, min(limit, len(found))).astype(int)]
        return chosen, f"{len(chosen)} JPEGs from {args.data}"
    from PIL import Image

    folder = work / "generated"
    folder.mkdir()
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, 200)[None, :, None]
    made = []
    for i in range(args.limit or 2000):
        pixels = np.clip(ramp + rng.normal(0, 20, (200, 200, 3)) + 20 * (i % 3), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
        made.append(str(folder / f"{i:05d}.jpg"))
    return made, f"{len(made)} generated 200x200 JPEGs ({args.data} not found)"


def launch(args: argparse.Namespace, way: str, listing: Path, work: Path) -> dict:
    """One torchrun launch building into a fresh folder: build s (slowest process), wall s, decodes."""
    out = Path(tempfile.mkdtemp(prefix=f"{way}-", dir=work))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               __file__, "--child", str(out), "--list", str(listing), "--cache-dir", str(out / "cache"),
               "--size", str(args.size)] + (["--workers", str(args.workers)] if args.workers else [])  # fmt: skip
    env = {**os.environ, "MANYHEADS_CACHE_BUILD": way, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.nproc)]
    shutil.rmtree(out)
    return {"build": max(r["seconds"] for r in ranks), "wall": wall, "decodes": sum(r["decoded"] for r in ranks)}


def main(argv: list[str] | None = None) -> str:
    """Measure, print the Markdown section (append it with --write) and return it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.child:
        child(args)
        return ""
    work = Path(tempfile.mkdtemp(prefix="mh-bench-cache-build-"))
    try:
        paths, described = pictures(args, work)
        listing = work / "paths.txt"
        listing.write_text("\n".join(paths))
        for path in paths:  # every launch finds the JPEGs in the page cache, the first one too
            Path(path).read_bytes()
        runs = {way: [] for way in args.ways}
        for round_ in range(args.rounds):
            order = args.ways if round_ % 2 == 0 else args.ways[::-1]
            for way in order:
                runs[way].append(launch(args, way, listing, work))
                last = runs[way][-1]
                print(f"round {round_ + 1}/{args.rounds} {way}: build {last['build']:.2f} s, launch "
                      f"{last['wall']:.2f} s, {last['decodes']} decodes", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    before = common.median([r["build"] for r in runs["each"]]) if "each" in runs else float("nan")
    rows = []
    for way, measured in runs.items():
        builds = [r["build"] for r in measured]
        rows.append([WAYS[way], common.median(builds), f"{common.fmt(min(builds))}-{common.fmt(max(builds))}",
                     common.median([r["wall"] for r in measured]), int(np.median([r["decodes"] for r in measured])),
                     before / common.median(builds)])  # fmt: skip
    header = ["way", "build s (median, slowest process)", "range", "launch wall s (median)", "decodes, all processes",
              "speed-up vs each"]  # fmt: skip
    child_command = (
        f"MANYHEADS_CACHE_BUILD=<way> torchrun --standalone --nproc_per_node={args.nproc} "
        f"benchmarks/cache_build.py --child OUT --list PATHS --cache-dir OUT/cache --size {args.size}"
    )
    notes = [
        f"{described}, decoded to {args.size} px; {args.nproc} processes; pool per process: "
        f"{args.workers or 'the default (split: CPUs / processes; each and main: all CPUs)'}; {args.rounds} "
        "alternating rounds, each launch into a fresh cache folder (cache_dir, on_bad='skip').",
        f"Each launch: `{child_command}`.",
        "build s: from a barrier every process passed (gloo) to the last process's memory-mapped cache; launch "
        "wall s adds torchrun's, Python's and torch's start-up. The JPEGs are read once beforehand (page cache warm).",
    ]
    return common.publish("Image cache build under torchrun", "cache_build.py", argv, args, common.table(header, rows),
                          notes)  # fmt: skip


if __name__ == "__main__":
    main()

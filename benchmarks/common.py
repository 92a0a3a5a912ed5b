"""Shared by the benchmark scripts: the machine header, timing, medians, Markdown tables, BENCHMARKS.md.

Each script runs its contenders alternately in one process and reports medians; ``--write``
appends the printed section to BENCHMARKS.md under a header naming the date, the machine,
the library versions and the exact command line.

    section = report("Overhead", "overhead.py", argv, table(["a", "b"], [[1, 2]]), notes)
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import manyheads as mh
from manyheads.datasets import UTKFACE_GENDERS, UTKFACE_RACES

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "BENCHMARKS.md"
DEFAULT_UTKFACE = ROOT.parent / "shared" / "data" / "utkface"


def flagship_heads() -> dict:
    """The flagship's heads, as the benchmarks build them: age regression, gender binary, race categorical."""
    return {"age": mh.Regression(), "gender": mh.Binary(UTKFACE_GENDERS), "race": mh.Categorical(UTKFACE_RACES)}


def device_of(name: str) -> torch.device:
    """``"auto"`` picks CUDA when available; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the device has finished its queued work."""
    sync(device)
    return time.perf_counter()


class PeakRSS:
    """Peak resident memory of this process during a ``with`` block, above what it held at entry (MiB).

    Linux only: entry resets the kernel's high-water mark (``/proc/self/clear_refs``), exit reads
    ``VmHWM``; ``growth_mib`` stays NaN elsewhere. ru_maxrss cannot do this: it never resets.

        with PeakRSS() as peak: train(); print(peak.growth_mib)
    """

    def __init__(self) -> None:
        self.start_kib = self.peak_kib = None
        self.growth_mib = float("nan")

    def __enter__(self) -> PeakRSS:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.start_kib = _proc_status_kib("VmRSS")
        except OSError:
            pass
        return self

    def __exit__(self, *exc) -> None:
        if self.start_kib is not None:
            self.peak_kib = _proc_status_kib("VmHWM")
            self.growth_mib = (self.peak_kib - self.start_kib) / 1024


def peak_tensor_mib(run: Callable[[], object]) -> float:
    """Peak of the CPU tensor memory allocated during ``run()`` and still live, in MiB.

    The CPU counterpart of ``torch.cuda.max_memory_allocated``: replays the torch profiler's
    allocation and free events in time order. Unlike resident memory it does not depend on where
    malloc puts blocks, so one call gives the same figure every time. Tensors that exist before
    the call (data, model) are not counted; the profiler slows the call, so it is timed elsewhere.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        # "[memory]" events are frees (and allocations) outside any op; an op counts its own bytes only
        live += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def same_allocator(device: torch.device) -> str:
    """Give every contender of this process mh.fit's CPU malloc settings from the start; a note saying so.

    mh.fit applies :func:`manyheads.allocator.keep_freed_memory` on the CPU, process-wide, so without
    this the contenders run before its first call would see another allocator than those after.
    """
    if device.type != "cpu":
        return "GPU run: the CPU allocator settings play no part."
    from manyheads.allocator import keep_freed_memory

    if keep_freed_memory():
        return ("Every contender runs with glibc malloc keeping freed memory (manyheads.allocator, which mh.fit "
                "applies on the CPU), set at the start of the process.")  # fmt: skip
    return "glibc malloc defaults for every contender (manyheads.allocator not applied here)."


def median(values: Sequence[float]) -> float:
    """Median of the measurements, NaN for none (a contender that did not run)."""
    return statistics.median(values) if values else float("nan")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine() -> str:
    """One line: CPU model, cores usable by this process, torch threads, GPU if any."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    text = f"{cpu_model()}, {usable} cores usable ({os.cpu_count()} online), torch threads {torch.get_num_threads()}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        text += f"; GPU {torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB)"
    else:
        text += "; no GPU"
    return text


def versions() -> str:
    """Python, torch, torchvision and manyheads versions (plus extras such as keras when given)."""
    import torchvision

    import manyheads

    parts = [
        f"Python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"torchvision {torchvision.__version__}",
        f"manyheads {manyheads.__version__}",
    ]
    if torch.cuda.is_available():
        parts.append(f"CUDA {torch.version.cuda}")
    return ", ".join(parts)


def command(script: str, argv: Sequence[str]) -> str:
    """The command line that reproduces this run, from the repository root."""
    return shlex.join(["python", f"benchmarks/{script}", *argv])


def fmt(value: float | int | str | None, digits: int = 3) -> str:
    """A table cell: numbers to ``digits`` significant digits, NaN/None as "n/a"."""
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value != value:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"


def table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table; cells go through :func:`fmt`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def report(title: str, script: str, argv: Sequence[str], body: str, notes: Sequence[str] = (), extra: str = "") -> str:
    """A Markdown section: heading with date, machine, versions and command, then ``body`` and notes."""
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        f"## {title} ({when})",
        "",
        f"- Machine: {machine()}",
        f"- Versions: {versions()}{', ' + extra if extra else ''}",
        f"- Command: `{command(script, argv)}`",
        "",
        body,
    ]
    if notes:
        lines.append("")
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def emit(section: str, write: bool, output: str | os.PathLike | None) -> None:
    """Print the section; with ``write`` append it to ``output`` (default BENCHMARKS.md)."""
    print(section, flush=True)
    if not write:
        return
    path = Path(output) if output else DEFAULT_OUTPUT
    before = path.read_text(encoding="utf-8") if path.exists() else ""
    with path.open("a", encoding="utf-8") as file:
        if not before:
            file.write("# Benchmarks\n\nMeasured by the scripts in `benchmarks/`; each section says how.\n\n")
        else:  # a hand-written section may end without its blank line: the heading would join its last list item
            trailing = len(before) - len(before.rstrip("\n"))
            file.write("\n" * max(0, 2 - trailing))
        file.write(section + "\n")
    print(f"appended to {path}", flush=True)


def publish(
    title: str, script: str, argv: Sequence[str], args, body: str, notes: Sequence[str] = (), extra: str = ""
) -> str:
    """:func:`report` the section, :func:`emit` it as ``args.write`` / ``args.output`` say, and return it."""
    section = report(title, script, argv, body, notes, extra)
    emit(section, args.write, args.output)
    return section


def child_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` without --write and --output FILE: for a child process whose parent does the writing."""
    keep = [a for a in argv if a != "--write"]
    if "--output" in keep:
        i = keep.index("--output")
        del keep[i : i + 2]
    return keep


def add_common_arguments(parser, *, tiny_help: str = "2-3 steps on tiny shapes: checks the script runs") -> None:
    """Options every script has: --device, --tiny, --write, --output, --seed."""
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--tiny", action="store_true", help=tiny_help)
    parser.add_argument("--write", action="store_true", help="append the results to BENCHMARKS.md")
    parser.add_argument("--output", default=None, help=f"file --write appends to (default {DEFAULT_OUTPUT.name})")
    parser.add_argument("--seed", type=int, default=0)

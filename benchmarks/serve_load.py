"""Load test of the prediction service: batching off and on, torch and ONNX, 1 to 32 clients, and past capacity.

Each configuration is its own service process (``manyheads serve MODEL --backend B --max-batch M
--max-wait-ms W``, uvicorn on loopback), all started first and then measured in turns: every
round runs each client count on every configuration, in rotated order, for ``--seconds``; the
table gives medians over the rounds. Batching off is ``--max-batch 1`` (each request alone, as
before batching). Each client is a thread with its own keep-alive httpx connection, posting one
JPEG per request (multipart) back to back. Past capacity: many clients against a service with a
small ``--max-queue`` (503 with Retry-After, clients wait as told) and against the same service
with the default queue (everyone waits), to show 503s instead of a growing p99.

    python benchmarks/serve_load.py runs/session5-flagship --write   # the flagship model
    python benchmarks/serve_load.py --quick                         # seconds on a tiny net: checks it runs
"""

from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import common
import httpx
import numpy as np
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import manyheads as mh


def photo(seed: int = 0, size: int = 200) -> bytes:
    """A smooth random JPEG about the size of a UTKFace crop (200 x 200)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def model_file(args: argparse.Namespace, folder: Path) -> Path:
    """The model to serve: the one given (run folder, .safetensors, .onnx) or a generated three-head net."""
    if args.model:
        path = Path(args.model)
        return path / "model.safetensors" if path.is_dir() else path
    torch.manual_seed(args.seed)
    heads = common.flagship_heads()
    return mh.MultiHeadNet(args.backbone, heads, image_size=args.image_size).save(folder / "model.safetensors")


@dataclass
class Service:
    """One service process and how it was started."""

    backend: str
    max_batch: int
    max_wait_ms: float
    max_queue: int | None = None
    port: int = 0
    process: subprocess.Popen | None = None
    log: Path | None = None
    rows: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def batching(self) -> str:
        if self.max_batch == 1:
            return "off (max_batch 1)"
        return f"max_batch {self.max_batch}, wait {self.max_wait_ms:g} ms"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(service: Service, model: Path, device: str, folder: Path) -> None:
    """Launch ``manyheads serve`` for the service (it is awaited by :func:`wait_ready`)."""
    service.port, service.log = free_port(), folder / f"serve-{len(list(folder.glob('serve-*')))}.log"
    command = [sys.executable, "-m", "manyheads", "serve", str(model), "--port", str(service.port),
               "--backend", service.backend, "--max-batch", str(service.max_batch),
               "--max-wait-ms", str(service.max_wait_ms), "--timeout-s", "60"]  # fmt: skip
    if service.max_queue is not None:
        command += ["--max-queue", str(service.max_queue)]
    if service.backend == "torch" and device != "cpu":
        command += ["--device", device]
    with service.log.open("w") as log:
        service.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(service: Service, limit_s: float = 300) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"the {service.backend} service exited: {service.log.read_text()[-2000:]}")
        try:
            if httpx.get(service.url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.3)
    raise RuntimeError(f"the {service.backend} service did not answer /health within {limit_s:.0f} s")


def batch_totals(url: str) -> tuple[float, float]:
    """(images run, model runs) so far, from the service's /metrics."""
    found = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name in ("manyheads_batch_images_sum", "manyheads_batch_images_count"):
                found[sample.name] = sample.value
    return found.get("manyheads_batch_images_sum", 0.0), found.get("manyheads_batch_images_count", 0.0)


def load(url: str, clients: int, seconds: float, blob: bytes, max_requests: int) -> dict:
    """``clients`` threads posting ``blob`` until ``seconds`` have passed (or ``max_requests`` were sent).

    A 503 is counted as shed and the client waits its Retry-After, as a well-behaved client does;
    latencies (ms) are of the answered (200) requests.
    """
    latencies: list[list[float]] = [[] for _ in range(clients)]
    shed, errors = [0] * clients, [0] * clients
    sent = iter(range(max_requests))
    start = threading.Barrier(clients + 1)
    files = {"file": ("face.jpg", blob, "image/jpeg")}

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=90) as http:
            http.post("/predict", files=files)  # warm the connection
            start.wait()
            while time.perf_counter() < deadline and next(sent, None) is not None:
                t0 = time.perf_counter()
                try:
                    response = http.post("/predict", files=files)
                except httpx.HTTPError:
                    errors[i] += 1
                    continue
                if response.status_code == 200:
                    latencies[i].append((time.perf_counter() - t0) * 1000)
                elif response.status_code == 503:
                    shed[i] += 1
                    wait = float(response.headers.get("retry-after", 1))
                    time.sleep(min(wait, max(0.0, deadline - time.perf_counter())))
                else:
                    errors[i] += 1

    deadline = float("inf")
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    deadline = began + seconds
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    flat = np.array([x for per in latencies for x in per]) if any(latencies) else np.array([np.nan])
    return {"requests": int(np.isfinite(flat).sum()), "rps": float(np.isfinite(flat).sum()) / elapsed,
            "p50": float(np.percentile(flat, 50)), "p99": float(np.percentile(flat, 99)), "shed": sum(shed),
            "errors": sum(errors)}  # fmt: skip


def measure(service: Service, clients: int, args: argparse.Namespace, blob: bytes) -> dict:
    images0, runs0 = batch_totals(service.url)
    result = load(service.url, clients, args.seconds, blob, args.max_requests)
    images1, runs1 = batch_totals(service.url)
    result["batch"] = (images1 - images0) / max(runs1 - runs0, 1)
    return result


def summary(results: list[dict]) -> list:
    """Medians over the rounds of requests/s, p50, p99 and images per model run; 503s and errors summed."""
    return [common.median([r[k] for r in results]) for k in ("rps", "p50", "p99")] + [
        sum(r["shed"] for r in results), sum(r["errors"] for r in results), common.median([r["batch"] for r in results])
    ]  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", help="run folder, .safetensors or .onnx (default: a generated net)")
    parser.add_argument("--clients", default="1,8,32", help="concurrent client counts, comma-separated")
    parser.add_argument("--seconds", type=float, default=5.0, help="per configuration, client count and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the table gives medians")
    parser.add_argument("--backend", choices=["torch", "onnx", "both"], default="both")
    parser.add_argument("--batching", default="16:5", help="batching-on configurations as MAX_BATCH:MAX_WAIT_MS, "
                        "comma-separated (e.g. 16:2,16:5,32:5,32:10); batching off (1:0) always runs")  # fmt: skip
    parser.add_argument("--overload-clients", type=int, default=64, help="clients of the past-capacity run")
    parser.add_argument("--overload-queue", type=int, default=8, help="the small --max-queue of the past-capacity run")
    parser.add_argument("--max-requests", type=int, default=50_000, help="at most this many requests per measurement")
    parser.add_argument("--backbone", default="mobilenet_v3_small", help="of the generated net")
    parser.add_argument("--image-size", type=int, default=128, help="of the generated net")
    parser.add_argument("--quick", action="store_true", help="a tiny generated net, 1 s per measurement, 1 round")
    common.add_common_arguments(parser, tiny_help="the same as --quick")
    args = parser.parse_args(argv)
    if args.quick or args.tiny:
        args.model, args.image_size, args.seconds, args.rounds = None, 32, 1.0, 1
        args.clients, args.overload_clients, args.overload_queue = "1,8", 16, 2
    args.device = str(common.device_of(args.device))
    return args


def services(args: argparse.Namespace, model: Path) -> tuple[list[Service], list[Service]]:
    """The services measured: every backend with batching off and on; then the two past capacity."""
    backends = ["onnx"] if model.suffix == ".onnx" else [b for b in ("torch", "onnx") if args.backend in (b, "both")]
    configs = [(1, 0.0)] + [(int(b), float(w)) for b, w in (item.split(":") for item in args.batching.split(","))]
    main = [Service(backend, batch, wait) for backend in backends for batch, wait in configs]
    on = next(s for s in main if s.max_batch > 1)
    return main, [Service(on.backend, on.max_batch, on.max_wait_ms, args.overload_queue), on]


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show as they come, also through a pipe
    blob, clients = photo(args.seed), [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        model = model_file(args, Path(folder))
        measured, overload = services(args, model)
        every = measured + overload[:1]
        for service in every:  # started together, then awaited: their start-up overlaps
            start(service, model, args.device, Path(folder))
        try:
            for service in every:
                wait_ready(service)
            for rnd in range(args.rounds):
                for n in clients:
                    turn = measured[rnd % len(measured) :] + measured[: rnd % len(measured)]
                    for service in turn:
                        result = measure(service, n, args, blob)
                        service.rows.setdefault(n, []).append(result)
                        print(f"round {rnd + 1}, {n} clients, {service.backend}, {service.batching}:", result)
            for service in overload:
                result = measure(service, args.overload_clients, args, blob)
                service.rows.setdefault("overload", []).append(result)
                print(f"past capacity, {args.overload_clients} clients, queue {service.max_queue}:", result)
        finally:
            for service in every:
                service.process.terminate()
                service.process.wait(timeout=30)
    header = ["backend", "batching", "clients", "requests/s", "p50 ms", "p99 ms", "503s", "errors", "images/run"]
    rows = [[s.backend, s.batching, n, *summary(s.rows[n])] for n in clients for s in measured]
    over = [[s.backend, s.batching, f"{args.overload_clients}, max_queue {s.max_queue or 'default (128)'}",
             *summary(s.rows["overload"])] for s in overload]  # fmt: skip
    body = common.table(header, rows) + "\n\nPast capacity (one round):\n\n" + common.table(header, over)
    name = args.model or f"generated {args.backbone} at {args.image_size} px, heads age/gender/race"
    notes = [
        f"Model: {name}; torch on {args.device}, ONNX (exported on the fly by `--backend onnx`) on the CPU. One "
        f"{len(blob) // 1024} KiB 200x200 JPEG per request (multipart), keep-alive connections; each service in its "
        f"own process with the machine's threads; rounds: {args.rounds}, {args.seconds:g} s per row in each, the "
        "configurations in rotated order each round, medians shown (503s and errors summed).",
        "p50/p99 are of answered (200) requests; a client that gets a 503 waits its Retry-After (1 s), so past "
        "capacity requests/s counts the answered ones of clients that also wait. images/run: images per model run "
        "(from /metrics), the batch size the batcher reached. Past capacity, max_queue bounds the images waiting; "
        "the batch being run (up to max_batch) comes on top.",
        "Service and clients share the machine.",
    ]
    return common.publish("Serving load: batching", "serve_load.py", argv, args, body, notes)


if __name__ == "__main__":
    main()

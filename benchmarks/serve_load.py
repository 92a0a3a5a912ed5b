"""Load test of the prediction service: N concurrent clients posting photos for a bounded time.

The service runs in its own process (``manyheads.serving.serve``, uvicorn on loopback) on a
given model (run folder, .safetensors or .onnx) or on a generated three-head net (age, gender,
race; random weights: speed does not depend on them), served by torch and by its ONNX export.
Each client is a thread with its own keep-alive httpx connection, posting one JPEG per request
(multipart) back to back. Reports requests/second, p50/p99 latency and errors per backend.

    python benchmarks/serve_load.py --clients 8 --seconds 10 --write
    python benchmarks/serve_load.py runs/faces --backend torch
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
from pathlib import Path

import common
import httpx
import numpy as np
import torch
from PIL import Image

import manyheads as mh
from manyheads.datasets import UTKFACE_GENDERS, UTKFACE_RACES


def photo(seed: int = 0, size: int = 200) -> bytes:
    """A smooth random JPEG about the size of a UTKFace crop (200 x 200)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def models(args: argparse.Namespace, folder: Path) -> dict[str, Path]:
    """Backend name -> model path to serve."""
    if args.model:
        path = Path(args.model)
        if path.suffix == ".onnx":
            return {"onnx": path}
        net_file = path / "model.safetensors" if path.is_dir() else path
        out = {"torch": net_file}
        if args.backend != "torch":
            out["onnx"] = mh.load(net_file).export_onnx(folder / "model.onnx")
    else:
        torch.manual_seed(args.seed)
        heads = {"age": mh.Regression(), "gender": mh.Binary(UTKFACE_GENDERS), "race": mh.Categorical(UTKFACE_RACES)}
        net = mh.MultiHeadNet(args.backbone, heads, image_size=args.image_size)
        out = {"torch": net.save(folder / "model.safetensors"), "onnx": net.export_onnx(folder / "model.onnx")}
    return {k: v for k, v in out.items() if args.backend in (k, "both")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, port: int) -> subprocess.Popen:
    code = f"from manyheads.serving import serve; serve({str(model)!r}, port={port})"
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the service for {model} exited with {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
    server.terminate()
    raise RuntimeError(f"the service for {model} did not answer /health within 120 s")


def load(url: str, clients: int, seconds: float, blob: bytes) -> dict:
    """``clients`` threads posting ``blob`` until ``seconds`` have passed; latencies in ms."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            http.post("/predict", files={"file": ("face.jpg", blob, "image/jpeg")})  # warm the connection
            start.wait()
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    ok = http.post("/predict", files={"file": ("face.jpg", blob, "image/jpeg")}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies[i].append((time.perf_counter() - t0) * 1000)
                errors[i] += not ok

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
    flat = np.array([x for per in latencies for x in per])
    return {
        "requests": len(flat), "rps": len(flat) / elapsed, "p50": float(np.percentile(flat, 50)),
        "p99": float(np.percentile(flat, 99)), "errors": sum(errors),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", help="run folder, .safetensors or .onnx (default: a generated net)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--backend", choices=["torch", "onnx", "both"], default="both")
    parser.add_argument("--backbone", default="mobilenet_v3_small", help="of the generated net")
    parser.add_argument("--image-size", type=int, default=128, help="of the generated net")
    common.add_common_arguments(parser, tiny_help="2 clients for 2 s on a 32 px net: checks the script runs")
    args = parser.parse_args(argv)
    if args.tiny:
        args.clients, args.seconds, args.image_size = 2, 2.0, 32
    blob = photo(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for backend, path in models(args, Path(folder)).items():
            port = free_port()
            server = start_server(path, port)
            try:
                result = load(f"http://127.0.0.1:{port}", args.clients, args.seconds, blob)
            finally:
                server.terminate()
                server.wait(timeout=30)
            print(f"{backend}: {result}", flush=True)
            rows.append([backend, args.clients, args.seconds, result["requests"], result["rps"], result["p50"],
                         result["p99"], result["errors"]])  # fmt: skip
    model = args.model or f"generated {args.backbone} at {args.image_size} px, heads age/gender/race"
    header = ["backend", "clients", "seconds", "requests", "requests/s", "p50 ms", "p99 ms", "errors"]
    notes = [
        f"Model: {model}. One {len(blob) // 1024} KiB 200x200 JPEG per request (multipart), keep-alive connections.",
        "Service and clients share the machine; the model runs one request at a time under a lock, so "
        "requests/s is about 1 / (decode + inference time) and latency grows with the number of clients.",
    ]
    return common.publish("Serving load", "serve_load.py", argv, args, common.table(header, rows), notes)


if __name__ == "__main__":
    main()

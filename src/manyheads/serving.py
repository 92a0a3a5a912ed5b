"""An HTTP prediction service (FastAPI) for a run folder, a model file or an ONNX export.

``POST /predict`` takes images as multipart files (field ``files`` or ``file``) or JSON
``{"images": [base64, ...]}`` and answers one entry per image, e.g.
``{"predictions": [{"age": {"value": 31.2}, "gender": {"value": "female", "probabilities":
{"male": 0.1, "female": 0.9}}}]}``. ``GET /health`` (the model and the queue), ``GET /schema``,
``GET /metrics`` (Prometheus text) and ``GET /`` (a page to try it).

Concurrency: a request is admitted to a bounded queue (``max_queue`` images; full: 503 with
Retry-After), its images are decoded in the threadpool, at most one decode per CPU at a time
(``max_decodes``), and then join the queue; one thread runs the model on up to ``max_batch``
queued images at once (:mod:`manyheads.batching`), and each request gets its own rows back. A
request not answered within ``timeout_s`` of its arrival also gets a 503 with Retry-After. An
image's size is read from its header before it is decoded: more than ``max_pixels`` (40
megapixels) is a 413. ``serve(..., workers=N)`` runs N such processes behind one port
(uvicorn's own workers), each with its own queue and batcher.

    serve("runs/faces", port=8000)  # or serve("faces.onnx"), serve("runs/faces", backend="onnx", workers=2)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ctypes
import errno
import functools
import io
import json
import logging
import os
import re
import socket
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from manyheads import images
from manyheads.batching import Batcher, QueueFull
from manyheads.distributed import usable_cpus
from manyheads.export import OnnxModel, export_onnx
from manyheads.inference import raw_outputs
from manyheads.net import MultiHeadNet, load, set_coverage

MAX_BYTES = 10 * 2**20  # per image
MAX_IMAGES = 16  # per request
MAX_PIXELS = 40_000_000  # per image, read from its header before anything is decoded
TRIM_PIXELS = 2**22  # after decoding an image this large, freed heap memory goes back to the system (glibc)
MAX_BATCH = 16  # images per model run
MAX_WAIT_MS = 5.0  # the longest the batcher waits for more images once it holds one
MAX_QUEUE = 128  # images admitted and not yet run (decoding or queued); beyond: 503
TIMEOUT_S = 10.0  # from a request's arrival to its answer; beyond: 503
RETRY_AFTER = {"Retry-After": "1"}  # seconds, on every 503
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)  # seconds
BACKENDS = ("torch", "onnx")
OPTIONS_ENV = "MANYHEADS_SERVE_OPTIONS"  # serve(workers=N) hands each worker its options here (JSON)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
USAGE = 'send multipart files in field "files" (or "file"), or JSON {"images": [base64, ...]}'


def load_model(
    model: str | os.PathLike | MultiHeadNet | OnnxModel,
    backend: str | None = None,
    *,
    threads: int | None = None,
    coverage: float | None = None,
) -> MultiHeadNet | OnnxModel:
    """A run folder (its model.safetensors), a .safetensors or a .onnx file, ready to predict.

    ``backend="onnx"`` runs a torch model with onnxruntime: it is exported to a temporary file,
    loaded and the file removed (nothing is written next to the model). ``None``: as the file is.
    ``coverage``: calibrated numbers' intervals at this coverage (an ONNX file has its own built in).

        load_model("runs/faces", "onnx")
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} (or None: as the file is), got {backend!r}")
    if isinstance(model, MultiHeadNet | OnnxModel):
        loaded = model
    else:
        path = _model_file(model)
        loaded = OnnxModel(path, threads=threads) if path.suffix == ".onnx" else load(path)
    if backend == "torch" and isinstance(loaded, OnnxModel):
        raise ValueError(f"{loaded.path} is an ONNX file, served by the onnx backend only; give the run folder or "
                         "its .safetensors file for torch")  # fmt: skip
    if coverage is not None:
        if isinstance(loaded, OnnxModel):
            raise ValueError(f"{loaded.path}: an ONNX file answers intervals at the coverage it was exported with; "
                             "serve the run folder (with --backend onnx) to choose the coverage")  # fmt: skip
        set_coverage(loaded, coverage)
    if backend == "onnx" and isinstance(loaded, MultiHeadNet):
        with tempfile.TemporaryDirectory(prefix="manyheads-onnx-") as folder:  # onnxruntime reads it at once
            loaded = OnnxModel(export_onnx(loaded, Path(folder) / "model.onnx"), threads=threads)
    return loaded


def _model_file(model: str | os.PathLike) -> Path:
    path = Path(model)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise ValueError(f"{path}: no such model file (give a run folder, a .safetensors or a .onnx file)")
    return path


def _device(name: str, backend: str) -> torch.device:
    """The device to serve on: the CPU, or a CUDA GPU that exists, for the torch backend."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r} is not a device name: give cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"device {name!r}: the service runs on cpu or cuda")
    if backend != "torch":
        raise ValueError(f"device {name!r}: the onnx backend runs on the CPU here; use the torch backend on a GPU")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available here (torch sees no GPU); serve with device cpu")
    if (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    return device


class Predictor:
    """Decoded images in, one JSON-ready dict per image out; torch (on the CPU or a GPU) or onnxruntime underneath.

    Predictor("runs/faces", device="cuda")(np.zeros((2, 3, 128, 128), np.uint8))  # two rows
    """

    def __init__(
        self,
        model: str | os.PathLike | MultiHeadNet | OnnxModel,
        *,
        backend: str | None = None,
        device: str = "cpu",
        threads: int | None = None,
        coverage: float | None = None,
    ) -> None:
        self.source = str(model) if isinstance(model, str | os.PathLike) else type(model).__name__
        self.model = load_model(model, backend, threads=threads, coverage=coverage)
        if self.model.image_size is None:
            raise ValueError("the service takes images, but this model has no image_size (not an image model)")
        self.heads = self.model.heads
        self.image_size: int = self.model.image_size
        self.backend = "onnx" if isinstance(self.model, OnnxModel) else "torch"
        self.device = _device(device, self.backend)
        self.lock = threading.Lock()
        if isinstance(self.model, MultiHeadNet):
            self.model.eval().to(self.device)

    def _outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if isinstance(self.model, OnnxModel):
            return self.model.outputs(batch)
        x = images.normalize(torch.from_numpy(batch).to(self.device))
        raw = raw_outputs(self.model, x, batch_size=len(batch))
        return {name: head.readout(raw[name]).cpu().numpy() for name, head in self.heads.items()}

    def __call__(self, batch: np.ndarray) -> list[dict[str, Any]]:
        with self.lock:
            outputs = self._outputs(batch)
        rows: list[dict[str, Any]] = [{} for _ in range(len(batch))]
        for name, head in self.heads.items():
            for row, answer in zip(rows, head.answers(outputs[name])):
                row[name] = answer  # whatever the head answers (value, probabilities, ...), passed through
        return rows

    def schema(self) -> dict[str, Any]:
        heads = {name: head.schema() for name, head in self.heads.items()}
        return {"image_size": self.image_size, "backend": self.backend, "heads": heads}


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (several apps in one process do not clash).

    Under ``serve(workers=N)`` (``PROMETHEUS_MULTIPROC_DIR`` set) every worker writes its values
    there and ``text()`` adds them all up: one figure for the service, whichever worker answers.

        metrics = Metrics(); metrics.requests.labels("200").inc(); metrics.text()
    """

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("manyheads_requests", "POST /predict requests answered, by HTTP status", ["status"],
                                registry=registry)  # fmt: skip
        self.shed = Counter("manyheads_shed", "Requests answered 503 unpredicted: queue full or timed out", ["reason"],
                            registry=registry)  # fmt: skip
        self.latency = Histogram("manyheads_request_seconds", "Time to answer POST /predict (any status)",
                                 buckets=LATENCY_BUCKETS, registry=registry)  # fmt: skip
        self.batch = Histogram("manyheads_batch_images", "Images per model run",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=registry)  # fmt: skip
        self.depth = Gauge("manyheads_queue_images", "Images admitted and not yet taken by the model",
                           multiprocess_mode="livesum", registry=registry)  # fmt: skip
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        for status in ("200", "400", "503"):  # shown from the start, at 0
            self.requests.labels(status)
        for reason in ("queue_full", "timeout"):
            self.shed.labels(reason)

    def text(self) -> bytes:
        """The metrics in Prometheus' text format: this process's, or every worker's under several."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    def close(self) -> None:
        """This worker is leaving: its live gauges (the queue depth) stop counting."""
        if self.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())


def _decode(blob: bytes, name: str, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """One uploaded image as uint8 [3, S, S], through the same file decoder training uses (EXIF, JPEG draft).

    Its size is read from the header first: over ``max_pixels`` is a 413 before any pixel is decoded.
    """
    pixels = _pixels(blob, name, max_pixels)
    fd, tmp = tempfile.mkstemp(prefix="manyheads-upload-")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(blob)
        return images.load_rgb(tmp, size).numpy()
    except images.BadImageError as error:
        raise HTTPException(400, f"{name}: {error.detail}") from None
    except Image.DecompressionBombError:
        raise HTTPException(413, f"{name}: too many pixels (Pillow's decompression-bomb limit)") from None
    except Exception as error:  # untrusted bytes: any decoder failure is the request's fault
        raise HTTPException(400, f"{name}: cannot decode ({type(error).__name__})") from None
    finally:
        os.unlink(tmp)
        if pixels >= TRIM_PIXELS:  # glibc keeps the freed buffers of a large decode in its arenas
            _trim_heap()


def _pixels(blob: bytes, name: str, max_pixels: int) -> int:
    """The image's pixel count from its header alone (0 if unreadable: the decoder then says why); 413 if too many."""
    try:
        with Image.open(io.BytesIO(blob)) as img:  # parses the header; decodes nothing
            width, height = img.size
    except Image.DecompressionBombError as error:  # over Pillow's own limit: it refuses once it read the size
        count = re.search(r"\((\d+) pixels\)", str(error))
        text = f"{int(count[1])} pixels" if count else "too many pixels"
        raise HTTPException(413, f"{name}: {text}, over the limit of {max_pixels} pixels") from None
    except Exception:
        return 0
    if width * height > max_pixels:
        raise HTTPException(
            413, f"{name}: {width} x {height} pixels ({width * height / 1e6:.1f} megapixels), over the limit of "
            f"{max_pixels} pixels"
        )  # fmt: skip
    return width * height


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and other C libraries
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def _trim_heap() -> None:
    """Give free heap memory back to the system (glibc's malloc_trim; a no-op elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _limited(request: Request, limit: int) -> Request:
    """The request, reading at most ``limit`` body bytes (chunked uploads carry no Content-Length)."""
    seen = 0

    async def receive() -> dict:
        nonlocal seen
        message = await request.receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise HTTPException(413, f"request body over {limit} bytes")
        return message

    return Request(request.scope, receive)


async def _multipart(request: Request, max_bytes: int, max_images: int) -> list[tuple[str, bytes]]:
    async with request.form(max_files=max_images + 1, max_fields=max_images + 8) as form:
        uploads = form.getlist("files") + form.getlist("file")
        blobs = []
        for i, upload in enumerate(uploads):
            if isinstance(upload, str):
                raise HTTPException(400, f"field {i} of files is text, not a file upload; {USAGE}")
            name = upload.filename or f"image {i}"
            if upload.size is not None and upload.size > max_bytes:
                raise HTTPException(413, f"{name}: {upload.size} bytes, over the limit of {max_bytes}")
            blobs.append((name, await upload.read()))
        return blobs


def _json_images(body: bytes, max_bytes: int) -> list[tuple[str, bytes]]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise HTTPException(400, f"body is not valid JSON; {USAGE}") from None
    except RecursionError:
        raise HTTPException(400, f"JSON nested too deeply; {USAGE}") from None
    items = data.get("images") if isinstance(data, dict) else None
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise HTTPException(400, f'JSON needs "images": a list of base64 strings; {USAGE}')
    blobs = []
    for i, item in enumerate(items):
        text = item.split(",", 1)[1] if item.startswith("data:") and "," in item else item  # data: URLs too
        if len(text) * 3 // 4 > max_bytes + 3:
            raise HTTPException(413, f"image {i}: over the limit of {max_bytes} bytes")
        try:
            blobs.append((f"image {i}", base64.b64decode(text, validate=True)))
        except (binascii.Error, ValueError):
            raise HTTPException(400, f"image {i}: not valid base64") from None
    return blobs


async def _uploads(request: Request, body_limit: int, max_bytes: int, max_images: int) -> list[tuple[str, bytes]]:
    """The request's images as (name, bytes), each checked against the limits; a 4xx with a message if not."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > body_limit:
        raise HTTPException(413, f"request body of {length} bytes is over the limit of {body_limit}")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limited = _limited(request, body_limit)
    if kind == "multipart/form-data":
        blobs = await _multipart(limited, max_bytes, max_images)
    elif kind == "application/json":
        blobs = _json_images(await limited.body(), max_bytes)
    else:
        raise HTTPException(415, f"content type {kind or 'none'!r} is not accepted; {USAGE}")
    if not blobs:
        raise HTTPException(400, f"no images in the request; {USAGE}")
    if len(blobs) > max_images:
        raise HTTPException(400, f"{len(blobs)} images in one request; the limit is {max_images}")
    for name, blob in blobs:
        if len(blob) > max_bytes:
            raise HTTPException(413, f"{name}: {len(blob)} bytes, over the limit of {max_bytes}")
        if not blob:
            raise HTTPException(400, f"{name}: empty file")
    return blobs


def _check_options(options: dict[str, Any]) -> None:
    """Every numeric option of :func:`create_app` that is given, in one message form."""
    for option in ("max_pixels", "max_decodes", "max_batch", "max_queue", "threads", "max_bytes", "max_images"):
        value = options.get(option)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{option} must be a positive integer, got {value!r}")
    for option, top in (("max_wait_ms", 60_000), ("timeout_s", 86_400)):
        value = options.get(option)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if value is not None and not (number and 0 <= value < top):
            raise ValueError(f"{option} must be a number in [0, {top}), got {value!r}")
    if options.get("timeout_s") == 0:
        raise ValueError("timeout_s must be more than 0 seconds")


def create_app(
    model: str | os.PathLike | MultiHeadNet | OnnxModel,
    *,
    backend: str | None = None,
    device: str = "cpu",
    max_batch: int = MAX_BATCH,
    max_wait_ms: float = MAX_WAIT_MS,
    max_queue: int = MAX_QUEUE,
    timeout_s: float = TIMEOUT_S,
    max_bytes: int = MAX_BYTES,
    max_images: int = MAX_IMAGES,
    max_pixels: int = MAX_PIXELS,
    max_decodes: int | None = None,
    threads: int | None = None,
    coverage: float | None = None,
    docs: bool = False,
) -> FastAPI:
    """The service as a FastAPI app: ``uvicorn.run(create_app("runs/faces", max_batch=16))``.

    ``backend`` "onnx" serves a torch model through onnxruntime (exported on the fly), ``device``
    "cuda" a torch model on the GPU. The model runs on up to ``max_batch`` images at a time,
    waiting at most ``max_wait_ms`` for more (``max_batch=1``: each request alone); at most
    ``max_queue`` images wait (more: 503 with Retry-After), and a request unanswered after
    ``timeout_s`` gets a 503 too. ``max_pixels`` per image is checked from its header before
    decoding (413 above it); at most ``max_decodes`` images (default: the CPUs this process may use)
    are decoded at once. ``threads``: the model's CPU threads (default: torch's and onnxruntime's
    own, every core). ``coverage``: calibrated numbers' intervals at this coverage. ``docs=True``
    adds FastAPI's ``/docs`` and ``/redoc`` pages, which load their
    scripts from a CDN (so they need the internet and tell the CDN of each visit); ``/schema`` is always there.
    """
    _check_options(dict(locals()))
    if threads is not None:
        torch.set_num_threads(threads)
    predictor = Predictor(model, backend=backend, device=device, threads=threads, coverage=coverage)
    metrics = Metrics()
    batcher = Batcher(predictor, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                      on_batch=metrics.batch.observe, on_depth=metrics.depth.set)  # fmt: skip
    decodes = threading.BoundedSemaphore(max_decodes or usable_cpus())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(batcher.close)
        metrics.close()

    app = FastAPI(title="manyheads", description="Predictions of a multi-head net", version="1", lifespan=lifespan,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None)  # fmt: skip
    body_limit = (max_bytes * max_images * 4) // 3 + 2**16  # base64 inflates by 4/3; room for multipart headers

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files("manyheads").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/health")
    def health() -> dict:
        queue = {"depth": batcher.depth, "capacity": max_queue, "max_batch": max_batch, "max_wait_ms": max_wait_ms,
                 "timeout_s": timeout_s}  # fmt: skip
        model = {"backend": predictor.backend, "device": str(predictor.device), "model": predictor.source,
                 "heads": list(predictor.heads)}  # fmt: skip
        return {"status": "ok", **model, "worker": os.getpid(), "queue": queue}

    @app.get("/schema")
    def schema() -> dict:
        return {**predictor.schema(), "max_bytes": max_bytes, "max_images": max_images, "max_pixels": max_pixels}

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    def decode(blobs: list[tuple[str, bytes]]) -> np.ndarray:
        def one(name: str, blob: bytes) -> np.ndarray:
            with decodes:  # each decode may hold about 4 bytes per pixel: a bounded number at a time
                return _decode(blob, name, predictor.image_size, max_pixels)

        return np.stack([one(name, blob) for name, blob in blobs])

    async def answer(request: Request, deadline: float) -> list[dict]:
        blobs = await _uploads(request, body_limit, max_bytes, max_images)
        try:
            ticket = batcher.admit(len(blobs))
        except QueueFull as error:
            metrics.shed.labels("queue_full").inc()
            raise HTTPException(503, f"{error}; retry later", headers=RETRY_AFTER) from None
        try:
            future = batcher.submit(ticket, await run_in_threadpool(decode, blobs))
            return await asyncio.wait_for(asyncio.wrap_future(future), max(deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            metrics.shed.labels("timeout").inc()
            raise HTTPException(503, f"no answer within timeout_s={timeout_s:g} s (the service is overloaded); "
                                "retry later", headers=RETRY_AFTER) from None  # fmt: skip
        finally:
            ticket.release()  # a request that gave up leaves the queue; a no-op once the model took it

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        start, status = time.monotonic(), 500
        try:
            response = JSONResponse({"predictions": await answer(request, start + timeout_s)})
            status = 200
            return response
        except HTTPException as error:
            status = error.status_code
            raise
        finally:
            metrics.requests.labels(str(status)).inc()
            metrics.latency.observe(time.monotonic() - start)

    return app


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, *, workers: int = 1, **kw: Any) -> None:
    """Run the service until interrupted: ``serve("runs/faces", port=8000)`` (``kw`` go to :func:`create_app`).

    ``workers=N`` runs N processes behind the one port (uvicorn's workers), each loading the model,
    with its own queue and batcher, and ``cores / N`` threads for its model and decodes unless
    ``threads`` / ``max_decodes`` say otherwise; ``/metrics`` adds up every worker's figures. A port
    outside 1-65535, one in use or a host it cannot listen on is a one-line error (ValueError or
    OSError), before the server starts.
    """
    import uvicorn

    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port {port!r} is not a port number: give one from 1 to 65535")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if workers > 1:
        _serve_workers(model, host, port, workers, kw)
        return
    app = create_app(model, **kw)
    sock = _listen(host, port)
    try:
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port))  # the Config sets up uvicorn's logging
        shown = f"[{host}]" if ":" in host else host  # uvicorn does not say where when given a socket
        logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)", shown, port)
        server.run(sockets=[sock])
    finally:
        sock.close()


def worker_app() -> FastAPI:
    """One worker's app under ``serve(workers=N)``: ``create_app`` with the options ``serve`` left in the environment.

    uvicorn.run("manyheads.serving:worker_app", factory=True, workers=2)  # with MANYHEADS_SERVE_OPTIONS set
    """
    options = json.loads(os.environ[OPTIONS_ENV])
    return create_app(options.pop("model"), **options)


def _serve_workers(model: str | os.PathLike, host: str, port: int, workers: int, kw: dict[str, Any]) -> None:
    """``workers`` uvicorn worker processes on one port; the options travel as JSON in the environment."""
    import uvicorn

    if isinstance(model, MultiHeadNet | OnnxModel):
        raise ValueError("serve(workers=N) needs a model file or run folder: each worker loads its own copy")
    _check_options(kw)
    path = _model_file(model)
    threads = max(1, usable_cpus() // workers)
    options = {"threads": threads, "max_decodes": threads, **kw, "model": str(path)}
    with tempfile.TemporaryDirectory(prefix="manyheads-serve-") as folder:
        _device(kw.get("device", "cpu"), "onnx" if path.suffix == ".onnx" or kw.get("backend") == "onnx" else "torch")
        if kw.get("backend") == "onnx" and path.suffix != ".onnx":  # exported once, here, for every worker
            net = load_model(path, coverage=options.pop("coverage", None))
            options["model"] = str(export_onnx(net, Path(folder) / "model.onnx"))
        metrics = os.environ.get(MULTIPROC_ENV) or str(Path(folder, "metrics"))
        Path(metrics).mkdir(exist_ok=True)
        _listen(host, port).close()  # a port in use is one clear error before any worker starts
        with _environment({OPTIONS_ENV: json.dumps(options), MULTIPROC_ENV: metrics}):
            uvicorn.run("manyheads.serving:worker_app", factory=True, host=host, port=port, workers=workers)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set (spawned workers inherit them), as it was afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``; a port in use or an address it cannot take is one clear OSError."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    if os.name != "nt":  # as uvicorn does: rebind at once after a restart (on Windows it would share the port)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise OSError(f"port {port} on {host} is in use (another server?); choose another port") from None
        raise OSError(f"cannot listen on {host} port {port}: {error.strerror or error}") from None
    return sock


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread (port 0: a free one); yields its base URL.

    with serve_in_thread(create_app("faces.onnx")) as url: httpx.get(url + "/health")
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, port))  # bound here, so the port is known before the server starts and cannot be taken
    url = f"http://[{host}]:{sock.getsockname()[1]}" if ":" in host else f"http://{host}:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the server for {url} did not start")
        time.sleep(0.01)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

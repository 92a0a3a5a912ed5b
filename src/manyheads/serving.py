"""An HTTP prediction service (FastAPI) for a run folder, a model file or an ONNX export.

``POST /predict`` takes images as multipart files (field ``files`` or ``file``) or JSON
``{"images": [base64, ...]}`` and answers one entry per image, e.g.
``{"predictions": [{"age": {"value": 31.2}, "gender": {"value": "female", "probabilities":
{"male": 0.1, "female": 0.9}}}]}``. ``GET /health``, ``GET /schema`` and ``GET /`` (a page to try it).

Concurrency: requests are parsed and images decoded concurrently in the threadpool, at most one
decode per CPU at a time (``max_decodes``); the model itself runs one batch at a time under a
lock (torch already spreads one batch over all cores). An image's size is read from its header
before it is decoded: more than ``max_pixels`` (40 megapixels) is a 413.

    serve("runs/faces", port=8000)  # or serve("faces.onnx")
"""

from __future__ import annotations

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
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image

from manyheads import images
from manyheads.export import OnnxModel
from manyheads.inference import raw_outputs
from manyheads.net import MultiHeadNet, load

MAX_BYTES = 10 * 2**20  # per image
MAX_IMAGES = 16  # per request
MAX_PIXELS = 40_000_000  # per image, read from its header before anything is decoded
TRIM_PIXELS = 2**22  # after decoding an image this large, freed heap memory goes back to the system (glibc)
USAGE = 'send multipart files in field "files" (or "file"), or JSON {"images": [base64, ...]}'


def load_model(model: str | os.PathLike | MultiHeadNet | OnnxModel) -> MultiHeadNet | OnnxModel:
    """A run folder (its model.safetensors), a .safetensors file or a .onnx file, ready to predict."""
    if isinstance(model, MultiHeadNet | OnnxModel):
        return model
    path = Path(model)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise ValueError(f"{path}: no such model file (give a run folder, a .safetensors or a .onnx file)")
    return OnnxModel(path) if path.suffix == ".onnx" else load(path)


class Predictor:
    """Decoded images in, one JSON-ready dict per image out; torch or onnxruntime underneath."""

    def __init__(self, model: str | os.PathLike | MultiHeadNet | OnnxModel) -> None:
        self.model = load_model(model)
        if self.model.image_size is None:
            raise ValueError("the service takes images, but this model has no image_size (not an image model)")
        self.heads = self.model.heads
        self.image_size: int = self.model.image_size
        self.backend = "onnx" if isinstance(self.model, OnnxModel) else "torch"
        self.lock = threading.Lock()
        if isinstance(self.model, MultiHeadNet):
            self.model.eval()

    def _outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if isinstance(self.model, OnnxModel):
            return self.model.outputs(batch)
        raw = raw_outputs(self.model, images.normalize(torch.from_numpy(batch)), batch_size=len(batch))
        return {name: head.readout(raw[name]).cpu().numpy() for name, head in self.heads.items()}

    def __call__(self, batch: np.ndarray) -> list[dict[str, Any]]:
        with self.lock:
            outputs = self._outputs(batch)
        rows: list[dict[str, Any]] = [{} for _ in range(len(batch))]
        for name, head in self.heads.items():
            for row, answer in zip(rows, head.answers(outputs[name])):
                row[name] = answer
        return rows

    def schema(self) -> dict[str, Any]:
        heads = {name: head.schema() for name, head in self.heads.items()}
        return {"image_size": self.image_size, "backend": self.backend, "heads": heads}


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


def create_app(
    model: str | os.PathLike | MultiHeadNet | OnnxModel,
    *,
    max_bytes: int = MAX_BYTES,
    max_images: int = MAX_IMAGES,
    max_pixels: int = MAX_PIXELS,
    max_decodes: int | None = None,
    docs: bool = False,
) -> FastAPI:
    """The service as a FastAPI app: ``uvicorn.run(create_app("runs/faces"))``.

    ``max_pixels`` per image is checked from its header before decoding (413 above it); at most
    ``max_decodes`` images (default: the CPUs this process may use) are decoded at once, the rest
    wait. ``docs=True`` adds FastAPI's ``/docs`` and ``/redoc`` pages, which load their scripts
    from a CDN (so they need the internet and tell the CDN of each visit); ``/schema`` is always there.
    """
    for option, value in (("max_pixels", max_pixels), ("max_decodes", max_decodes or 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{option} must be a positive integer, got {value!r}")
    predictor = Predictor(model)
    decodes = threading.BoundedSemaphore(max_decodes or _cpus())
    app = FastAPI(title="manyheads", description="Predictions of a multi-head net", version="1",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None)  # fmt: skip
    body_limit = (max_bytes * max_images * 4) // 3 + 2**16  # base64 inflates by 4/3; room for multipart headers

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files("manyheads").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "backend": predictor.backend}

    @app.get("/schema")
    def schema() -> dict:
        return {**predictor.schema(), "max_bytes": max_bytes, "max_images": max_images, "max_pixels": max_pixels}

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        blobs = await _uploads(request, body_limit, max_bytes, max_images)

        def decode(name: str, blob: bytes) -> np.ndarray:
            with decodes:  # each decode may hold about 4 bytes per pixel: a bounded number at a time
                return _decode(blob, name, predictor.image_size, max_pixels)

        def run() -> list[dict]:
            return predictor(np.stack([decode(name, blob) for name, blob in blobs]))

        return JSONResponse({"predictions": await run_in_threadpool(run)})

    return app


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, **kw: Any) -> None:
    """Run the service until interrupted: ``serve("runs/faces", port=8000)`` (``kw`` go to :func:`create_app`).

    A port outside 1-65535, one in use or a host it cannot listen on is a one-line error
    (ValueError or OSError), before the server starts.
    """
    import uvicorn

    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port {port!r} is not a port number: give one from 1 to 65535")
    app = create_app(model, **kw)
    sock = _listen(host, port)
    try:
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port))  # the Config sets up uvicorn's logging
        shown = f"[{host}]" if ":" in host else host  # uvicorn does not say where when given a socket
        logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)", shown, port)
        server.run(sockets=[sock])
    finally:
        sock.close()


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
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
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

"""An HTTP prediction service (FastAPI) for a run folder, a model file or an ONNX export.

``POST /predict`` takes images as multipart files (field ``files`` or ``file``) or JSON
``{"images": [base64, ...]}`` and answers one entry per image, e.g.
``{"predictions": [{"age": {"value": 31.2}, "gender": {"value": "female", "probabilities":
{"male": 0.1, "female": 0.9}}}]}``. ``GET /health``, ``GET /schema`` and ``GET /`` (a page to try it).

Concurrency: requests are parsed and images decoded concurrently in the threadpool; the model
itself runs one batch at a time under a lock (torch already spreads one batch over all cores).

    serve("runs/faces", port=8000)  # or serve("faces.onnx")
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import socket
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
from manyheads.export import OnnxModel, decode
from manyheads.heads import Regression
from manyheads.net import MultiHeadNet, load

MAX_BYTES = 10 * 2**20  # per image
MAX_IMAGES = 16  # per request
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
        net = self.model
        device = next(net.parameters()).device
        with torch.no_grad():
            raw = net(images.normalize(torch.from_numpy(batch).to(device)))
        return {name: head.readout(raw[name]).cpu().numpy() for name, head in self.heads.items()}

    def __call__(self, batch: np.ndarray) -> list[dict[str, Any]]:
        with self.lock:
            outputs = self._outputs(batch)
        rows: list[dict[str, Any]] = [{} for _ in range(len(batch))]
        for name, head in self.heads.items():
            values = decode(head, outputs[name])
            for i, row in enumerate(rows):
                if isinstance(head, Regression):
                    row[name] = {"value": values[i]}
                else:
                    probs = {str(label): float(p) for label, p in zip(head.labels, outputs[name][i])}
                    row[name] = {"value": values[i], "probabilities": probs}
        return rows

    def schema(self) -> dict[str, Any]:
        heads = {name: {"kind": head.kind, "labels": head.labels if head.kind != "regression" else None}
                 for name, head in self.heads.items()}  # fmt: skip
        return {"image_size": self.image_size, "backend": self.backend, "heads": heads}


def _decode(blob: bytes, name: str, size: int) -> np.ndarray:
    """One uploaded image as uint8 [3, S, S], through the same file decoder training uses (EXIF, JPEG draft)."""
    fd, tmp = tempfile.mkstemp(prefix="manyheads-upload-")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(blob)
        return images.load_rgb(tmp, size).numpy()
    except images.BadImageError as error:
        raise HTTPException(400, f"{name}: {error.reason}") from None
    except Image.DecompressionBombError:
        raise HTTPException(413, f"{name}: too many pixels (Pillow's decompression-bomb limit)") from None
    except Exception as error:  # untrusted bytes: any decoder failure is the request's fault
        raise HTTPException(400, f"{name}: cannot decode ({type(error).__name__})") from None
    finally:
        os.unlink(tmp)


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


def create_app(
    model: str | os.PathLike | MultiHeadNet | OnnxModel, *, max_bytes: int = MAX_BYTES, max_images: int = MAX_IMAGES
) -> FastAPI:
    """The service as a FastAPI app: ``uvicorn.run(create_app("runs/faces"))``."""
    predictor = Predictor(model)
    app = FastAPI(title="manyheads", description="Predictions of a multi-head net", version="1")
    body_limit = (max_bytes * max_images * 4) // 3 + 2**16  # base64 inflates by 4/3; room for multipart headers

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files("manyheads").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "backend": predictor.backend}

    @app.get("/schema")
    def schema() -> dict:
        return {**predictor.schema(), "max_bytes": max_bytes, "max_images": max_images}

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
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

        def run() -> list[dict]:
            batch = np.stack([_decode(blob, name, predictor.image_size) for name, blob in blobs])
            return predictor(batch)

        return JSONResponse({"predictions": await run_in_threadpool(run)})

    return app


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, **kw: Any) -> None:
    """Run the service until interrupted: ``serve("runs/faces", port=8000)`` (``kw`` go to :func:`create_app`)."""
    import uvicorn

    uvicorn.run(create_app(model, **kw), host=host, port=port)


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

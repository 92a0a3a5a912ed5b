"""Hostile and unusual input on purpose: wide image modes, a full disk, text in numeric columns, and a
service under large, deep or many requests (a real uvicorn server on 127.0.0.1)."""

import ctypes
import errno
import io
import struct
import threading
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import manyheads as mh
from conftest import half_written_save
from manyheads import checkpoint, serving
from manyheads.images import load_rgb
from manyheads.serving import create_app, serve_in_thread

# ---- images: every Pillow mode against a known 8-bit rendering ---------------------------------

G = np.arange(256, dtype=np.uint8).reshape(16, 16)  # every 8-bit value once: the gradient each mode encodes


def png_file(width: int, height: int, bit_depth: int, color_type: int, compressed: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", compressed) + chunk(b"IEND", b"")


def png(pixels: np.ndarray, bit_depth: int) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB): [H, W] grey or [H, W, C] with C in 2, 3, 4."""
    h, w = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + pixels[y].astype(dtype).tobytes() for y in range(h))
    return png_file(w, h, bit_depth, {1: 0, 2: 4, 3: 2, 4: 6}[channels], zlib.compress(raw))


def saved(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[:, :, None], 3, axis=2)


def palette_with_transparency() -> tuple[bytes, np.ndarray]:
    colours = np.stack([G.ravel(), 255 - G.ravel(), G.ravel() // 2], 1).astype(np.uint8)  # index i -> colour
    image = Image.frombytes("P", (16, 16), G.tobytes())
    image.putpalette(colours.ravel().tolist())
    image.info["transparency"] = bytes([0] + [255] * 100 + [128] * 155)  # per-index alpha: a tRNS chunk
    return saved(image, "PNG"), colours[G]


def mode_cases() -> dict:
    """name -> (encoded file, expected uint8 [16, 16, 3], Pillow mode it opens as)."""
    wide = G.astype(np.uint16) * 257  # the same gradient in 16 bits: 0, 257, ..., 65535
    bits = (np.indices((16, 16)).sum(0) % 2).astype(bool)  # a checkerboard
    cmyk = Image.merge("CMYK", [Image.fromarray(c) for c in (G, 255 - G, G // 2, np.zeros_like(G))])
    p_file, p_expected = palette_with_transparency()
    rgb = np.stack([G, 255 - G, G // 2], 2)
    big_endian = Image.frombytes("I;16B", (16, 16), wide.astype(">u2").tobytes())
    return {
        "I;16 png": (png(wide, 16), grey(G), "I;16"),
        "16-bit RGB png": (png(rgb.astype(np.uint16) * 257, 16), rgb, "RGB"),
        "16-bit grey+alpha png": (png(np.stack([wide, 65535 - wide], 2), 16), grey(G), "RGBA"),  # Pillow: RGBA
        "16-bit RGBA png": (png(np.dstack([rgb.astype(np.uint16) * 257, wide]), 16), rgb, "RGBA"),
        "I;16B tiff": (saved(big_endian, "TIFF"), grey(G), "I;16B"),
        "I 16-bit values tiff": (saved(Image.fromarray(wide.astype(np.int32)), "TIFF"), grey(G), "I"),
        "I 8-bit values tiff": (saved(Image.fromarray(G.astype(np.int32)), "TIFF"), grey(G), "I"),
        "F in [0, 1] tiff": (saved(Image.fromarray(G.astype(np.float32) / 255), "TIFF"), grey(G), "F"),
        "F in [0, 255] tiff": (saved(Image.fromarray(G.astype(np.float32)), "TIFF"), grey(G), "F"),
        "LA png": (saved(Image.fromarray(np.stack([G, 255 - G], 2), "LA"), "PNG"), grey(G), "LA"),
        "P with transparency png": (p_file, p_expected, "P"),
        "1 png": (saved(Image.fromarray(bits), "PNG"), grey(bits.astype(np.uint8) * 255), "1"),
        "RGBA png": (saved(Image.fromarray(np.dstack([rgb, 255 - G])), "PNG"), rgb, "RGBA"),
        "CMYK tiff": (saved(cmyk, "TIFF"), np.stack([255 - G, G, 255 - G // 2], 2), "CMYK"),
        "L png": (saved(Image.fromarray(G), "PNG"), grey(G), "L"),
    }


MODES = mode_cases()


@pytest.mark.parametrize("case", list(MODES))
def test_every_mode_decodes_to_its_8bit_rendering(case, tmp_path):
    data, expected, mode = MODES[case]
    path = tmp_path / ("image.tif" if case.endswith("tiff") else "image.png")
    path.write_bytes(data)
    with Image.open(path) as image:
        assert image.mode == mode  # the case tests what it says
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's "convert to RGBA first" warning is a failure too
        from_file = load_rgb(path, 16)
        with Image.open(path) as image:
            from_image = load_rgb(image, 16)
    for decoded in (from_file, from_image):
        difference = np.abs(decoded.numpy().transpose(1, 2, 0).astype(int) - expected.astype(int))
        assert difference.max() <= 1, f"{case}: off by up to {difference.max()}"


def test_wide_modes_outside_the_usual_ranges_are_stretched_and_nan_is_refused(tmp_path):
    stretched = load_rgb(Image.fromarray(G.astype(np.int32) * 1000 - 70_000), 16)  # -70000..185000
    assert torch.equal(stretched[0], torch.from_numpy(G))
    nan = G.astype(np.float32)
    nan[3, 3] = np.nan
    with pytest.raises(mh.images.BadImageError, match="NaN or inf"):
        load_rgb(Image.fromarray(nan), 16)
    (tmp_path / "nan.tif").write_bytes(saved(Image.fromarray(nan), "TIFF"))
    with pytest.raises(mh.images.BadImageError, match=r"nan\.tif.*NaN or inf"):
        load_rgb(tmp_path / "nan.tif", 16)


def test_a_16bit_png_trains_and_predicts_as_its_8bit_twin(tmp_path):
    dark = (G // 4).astype(np.uint16)  # a dark picture: in 8 bits, values 0..63
    (tmp_path / "wide.png").write_bytes(png(dark * 257, 16))
    (tmp_path / "narrow.png").write_bytes(png(dark.astype(np.uint8), 8))
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net = mh.MultiHeadNet(trunk, {"y": mh.Regression()}, image_size=16)
    images = [str(tmp_path / "wide.png"), str(tmp_path / "narrow.png")] * 4
    mh.fit(net, {"image": images, "y": [1.0, 1.0, 2.0, 2.0] * 2}, epochs=1, batch_size=4, progress=False)
    wide, narrow = net.predict([tmp_path / "wide.png", tmp_path / "narrow.png"])["y"]
    assert wide == pytest.approx(narrow, abs=1e-5)
    assert load_rgb(tmp_path / "wide.png", 16).max() == 63  # not a white image


# ---- a full disk while writing ----------------------------------------------------------------


def test_a_full_disk_says_which_file_and_that_nothing_was_lost(tmp_path, monkeypatch):
    path = tmp_path / checkpoint.NAME
    checkpoint.save(path, {"model": {"w": torch.ones(3)}, "step": 1})
    monkeypatch.setattr(torch, "save", half_written_save(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(checkpoint.DiskFullError) as caught:
        checkpoint.save(path, {"model": {"w": torch.zeros(1000)}, "step": 2})
    message = str(caught.value)
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ENOSPC
    assert str(path) in message and "no space left" in message and "nothing was lost" in message
    assert "\n" not in message and "Traceback" not in message
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.NAME]  # no temporary file left behind


def test_a_full_disk_as_torch_and_safetensors_report_it(tmp_path, monkeypatch):
    import safetensors.torch

    # torch's zip writer turns the failed write into RuntimeError("... unexpected pos ..."), the
    # OSError in its context; safetensors gives its own error whose text carries "os error 28".
    def torch_full(obj, file, *args, **kwargs):
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    monkeypatch.setattr(torch, "save", torch_full)
    with pytest.raises(checkpoint.DiskFullError, match=r"disk quota exceeded.*nothing was lost"):
        checkpoint.save(tmp_path / "first.pt", {"model": {}})

    def safetensors_full(tensors, filename, metadata=None):
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", safetensors_full)
    net = mh.MultiHeadNet(nn.Linear(4, 6), {"y": mh.Regression()})
    net(torch.zeros(2, 4))
    with pytest.raises(checkpoint.DiskFullError) as caught:
        net.save(tmp_path / "model.safetensors")
    assert str(tmp_path / "model.safetensors") in str(caught.value)
    assert "no file was there before" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


# ---- text in a numeric label column ---------------------------------------------------------


def test_one_text_cell_in_a_numeric_column_costs_only_its_row(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    ages = [str(20 + i % 50) for i in range(170)]
    ages[37] = "abc"
    (tmp_path / "labels.csv").write_text("image,age\n" + "".join(f"a.png,{age}\n" for age in ages))
    df = mh.datasets.from_csv(tmp_path / "labels.csv")
    assert df.loc[0, "age"] == 20 and df.loc[37, "age"] == "abc"
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    options = dict(epochs=1, batch_size=32, progress=False, workers=1)
    net = mh.MultiHeadNet(trunk, {"age": mh.Regression()}, image_size=8)
    with pytest.raises(ValueError, match=r"head 'age', column 'age', row 37: .*got 'abc'"):
        mh.fit(net, df, **options)
    with pytest.warns(UserWarning, match=r"skipped 1 bad rows \(label not a number: 1\)"):
        result = mh.fit(net, df, on_bad="skip", **options)
    assert [item.row for item in result.skipped] == [37]
    assert result.history["train/age/labels"].iloc[0] == 169


# ---- the service --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    """A small image net (the service takes the object as well as a file)."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net = mh.MultiHeadNet(trunk, {"age": mh.Regression(), "kind": mh.Categorical(["a", "b"])}, image_size=32)
    net(torch.zeros(1, 3, 32, 32))
    return net.eval()


def big_png(width: int, height: int) -> bytes:
    """A black RGB PNG of width x height, compressed row by row (a 40-megapixel one is about 120 KB)."""
    packer = zlib.compressobj(9)
    row = bytes(1 + 3 * width)
    return png_file(width, height, 8, 2, b"".join(packer.compress(row) for _ in range(height)) + packer.flush())


def claims_png(width: int, height: int) -> bytes:
    """A PNG whose header says width x height and whose pixel data is a few bytes: decoding it would fail."""
    return png_file(width, height, 8, 2, zlib.compress(bytes(16)))


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def post_image(client, blob, name="big.png"):
    return client.post("/predict", files={"files": (name, blob, "image/png")})


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_too_many_pixels_get_413_from_the_header_alone(model):
    huge = claims_png(12_000, 12_000)  # says 144 megapixels, holds next to none
    bomb = claims_png(20_000, 20_000)  # past Pillow's own decompression-bomb limit
    with serve_in_thread(create_app(model)) as url, httpx.Client(base_url=url, timeout=30) as client:
        for blob, words in ((huge, "12000 x 12000 pixels"), (bomb, "big.png: 400000000 pixels")):
            response = post_image(client, blob)
            assert response.status_code == 413, response.text
            assert words in response.json()["detail"] and "limit of 40000000 pixels" in response.json()["detail"]
        assert client.get("/schema").json()["max_pixels"] == 40_000_000
    with serve_in_thread(create_app(model, max_pixels=1000)) as url:
        small = httpx.post(url + "/predict", files={"files": ("a.png", big_png(40, 25), "image/png")})
        large = httpx.post(url + "/predict", files={"files": ("b.png", big_png(40, 26), "image/png")})
    assert small.status_code == 200 and large.status_code == 413
    assert "b.png: 40 x 26 pixels" in large.json()["detail"]
    with pytest.raises(ValueError, match="max_pixels"):
        create_app(model, max_pixels=0)


def test_decodes_are_bounded_by_a_semaphore(model, monkeypatch):
    real, running, most = serving.images.load_rgb, [0], [0]
    lock = threading.Lock()

    def slow_decode(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.2)
            return real(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(serving.images, "load_rgb", slow_decode)
    blob = big_png(40, 40)
    with serve_in_thread(create_app(model, max_decodes=2)) as url, httpx.Client(base_url=url, timeout=30) as c:
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: post_image(c, blob).status_code, range(8)))
    assert statuses == [200] * 8 and most[0] == 2


def test_a_burst_of_near_limit_images_gives_its_memory_back(model):
    blob = big_png(6300, 6340)  # 39.9 megapixels, just under the default limit; about 120 KB
    over = big_png(6400, 6400)  # 41 megapixels
    # 8 decodes of 40 megapixels can pass the default 10 s queue timeout on a loaded machine (503): not tested here
    app = create_app(model, timeout_s=120)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=150) as client:
        assert post_image(client, big_png(64, 64)).status_code == 200  # warm up: threads, model, first request
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before = resident_bytes()
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda i: post_image(client, over if i == 3 else blob), range(8)))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 413} and statuses.count(413) == 1 and statuses[3] == 413, statuses
        after = resident_bytes()
        assert after - before < 300 * 2**20, f"resident memory {before >> 20} MB before the burst, {after >> 20} after"
        assert client.get("/health").json()["status"] == "ok"


def test_the_service_answers_a_16bit_png_as_its_8bit_twin(model):
    dark = (G // 4).astype(np.uint16)
    files = [("files", ("wide.png", png(dark * 257, 16), "image/png")),
             ("files", ("narrow.png", png(dark.astype(np.uint8), 8), "image/png")),
             ("files", ("white.png", png(np.full((16, 16), 255, np.uint8), 8), "image/png"))]  # fmt: skip
    with serve_in_thread(create_app(model)) as url:
        wide, narrow, white = httpx.post(url + "/predict", files=files).json()["predictions"]
    assert wide["age"]["value"] == pytest.approx(narrow["age"]["value"], abs=1e-5)
    assert wide["age"]["value"] != pytest.approx(white["age"]["value"], abs=1e-3)


def test_json_nested_100000_deep_gets_400(model):
    with serve_in_thread(create_app(model)) as url:
        for body in ("[" * 100_000 + "]" * 100_000, '{"images": ' + "[" * 100_000 + "]" * 100_000 + "}"):
            response = httpx.post(url + "/predict", content=body, headers={"content-type": "application/json"})
            assert response.status_code == 400, response.text
            assert "nested too deeply" in response.json()["detail"]
        assert httpx.get(url + "/health").status_code == 200


def test_docs_pages_are_off_unless_asked_for(model):
    with serve_in_thread(create_app(model)) as url:
        assert httpx.get(url + "/docs").status_code == 404 and httpx.get(url + "/redoc").status_code == 404
        assert httpx.get(url + "/schema").status_code == 200
    with serve_in_thread(create_app(model, docs=True)) as url:
        assert httpx.get(url + "/docs").status_code == 200 and httpx.get(url + "/redoc").status_code == 200

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import manyheads as mh
from manyheads.export import export_onnx
from manyheads.serving import create_app, load_model, serve_in_thread

RACES = ["White", "Black", "Asian", "Indian", "Others"]
MAX_BYTES = 40_000
MAX_IMAGES = 3


def photo(seed=0, size=(48, 40), fmt="PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as training leaves it: model.safetensors of an untrained backbone net (regnet: its outputs vary)."""
    torch.manual_seed(0)
    heads = {"age": mh.Regression(), "gender": mh.Binary(["male", "female"]), "race": mh.Categorical(RACES)}
    net = mh.MultiHeadNet("regnet_y_400mf", heads, image_size=32)
    folder = tmp_path_factory.mktemp("run")
    net.save(folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def url(run_dir):
    with serve_in_thread(create_app(run_dir, max_bytes=MAX_BYTES, max_images=MAX_IMAGES)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=30) as c:
        yield c


def check_prediction(entry):
    assert set(entry) == {"age", "gender", "race"}
    assert set(entry["age"]) == {"value"} and isinstance(entry["age"]["value"], float)
    for name, labels in (("gender", ["male", "female"]), ("race", RACES)):
        probabilities = entry[name]["probabilities"]
        assert list(probabilities) == labels
        assert sum(probabilities.values()) == pytest.approx(1, abs=1e-5)
        assert entry[name]["value"] == max(probabilities, key=probabilities.get)


def test_health_and_schema(client):
    assert client.get("/health").json() == {"status": "ok", "backend": "torch"}
    schema = client.get("/schema").json()
    assert schema["image_size"] == 32 and schema["max_images"] == MAX_IMAGES and schema["max_bytes"] == MAX_BYTES
    assert schema["heads"] == {
        "age": {"kind": "regression", "labels": None},
        "gender": {"kind": "binary", "labels": ["male", "female"]},
        "race": {"kind": "categorical", "labels": RACES},
    }


def test_one_image_matches_the_net(client, run_dir, tmp_path):
    path = tmp_path / "face.jpg"
    path.write_bytes(photo(1, fmt="JPEG"))
    response = client.post("/predict", files={"file": ("face.jpg", path.read_bytes(), "image/jpeg")})
    assert response.status_code == 200
    (entry,) = response.json()["predictions"]
    check_prediction(entry)
    net = mh.load(run_dir / "model.safetensors")
    assert entry["age"]["value"] == pytest.approx(net.predict(path)["age"][0], abs=1e-4)
    np.testing.assert_allclose(
        list(entry["race"]["probabilities"].values()), net.predict_proba(path)["race"][0], atol=1e-5
    )


def test_batches_by_multipart_and_base64_agree(client):
    blobs = [photo(seed) for seed in range(3)]
    multipart = client.post("/predict", files=[("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)])
    encoded = [base64.b64encode(b).decode() for b in blobs]
    encoded[1] = "data:image/png;base64," + encoded[1]  # what a browser's FileReader gives
    as_json = client.post("/predict", json={"images": encoded})
    assert multipart.status_code == as_json.status_code == 200
    first, second = multipart.json()["predictions"], as_json.json()["predictions"]
    assert len(first) == len(second) == 3
    for a, b in zip(first, second):
        check_prediction(a)
        assert a["age"]["value"] == pytest.approx(b["age"]["value"], abs=1e-5)
        assert a["race"]["value"] == b["race"]["value"]
    assert len({entry["age"]["value"] for entry in first}) == 3  # one entry per image, in order


def test_the_onnx_export_serves_the_same_answers(client, run_dir, tmp_path):
    onnx_path = export_onnx(mh.load(run_dir / "model.safetensors"), tmp_path / "model.onnx")
    files = [("files", (f"{i}.png", photo(10 + i), "image/png")) for i in range(2)]
    with serve_in_thread(create_app(onnx_path)) as base:
        assert httpx.get(base + "/health").json()["backend"] == "onnx"
        from_onnx = httpx.post(base + "/predict", files=files).json()["predictions"]
    from_torch = client.post("/predict", files=files).json()["predictions"]
    for a, b in zip(from_onnx, from_torch):
        check_prediction(a)
        assert a["age"]["value"] == pytest.approx(b["age"]["value"], abs=1e-4)
        for label, p in a["race"]["probabilities"].items():
            assert p == pytest.approx(b["race"]["probabilities"][label], abs=1e-4)


def chunks(data: bytes, size: int = 8192):
    for i in range(0, len(data), size):
        yield data[i : i + size]


BAD = {
    "not an image": ({"files": {"files": ("a.png", b"hello, world", "image/png")}}, 400, "not an image"),
    "empty file": ({"files": {"file": ("a.png", b"", "image/png")}}, 400, "empty"),
    "truncated": ({"files": {"file": ("a.jpg", photo(0, fmt="JPEG")[:300], "image/jpeg")}}, 400, "a.jpg"),
    "file too large": ({"files": {"files": ("big.png", b"x" * (MAX_BYTES + 1), "image/png")}}, 413, "limit"),
    "too many": ({"files": [("files", (f"{i}.png", photo(i), "image/png")) for i in range(4)]}, 400, "limit is 3"),
    "no files": ({"data": {"note": "hi"}, "files": {"other": ("a.txt", b"x")}}, 400, "no images"),
    "text in files": ({"data": {"files": "abc"}, "files": {"x": ("a", b"1")}}, 400, "not a file"),
    "bad base64": ({"json": {"images": ["%%% not base64"]}}, 400, "base64"),
    "base64 too large": ({"json": {"images": [base64.b64encode(b"x" * (MAX_BYTES + 10)).decode()]}}, 413, "limit"),
    "base64 not an image": ({"json": {"images": [base64.b64encode(b"plain text").decode()]}}, 400, "not an image"),
    "empty json list": ({"json": {"images": []}}, 400, "no images"),
    "json without images": ({"json": {"pictures": ["x"]}}, 400, "images"),
    "broken json": ({"content": b"{", "headers": {"content-type": "application/json"}}, 400, "JSON"),
    "wrong content type": ({"content": b"abc", "headers": {"content-type": "text/plain"}}, 415, "text/plain"),
    "no content type": ({"content": b"abc"}, 415, "content type"),
    "body too large": ({"content": b"x" * 400_000, "headers": {"content-type": "application/json"}}, 413, "limit"),
    "chunked too large": (
        {"content": chunks(b"x" * 400_000), "headers": {"content-type": "application/json"}}, 413, "over"
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_a_4xx_with_a_message(client, case):
    request, status, words = BAD[case]
    response = client.post("/predict", **request)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]


def test_concurrent_requests_all_succeed_and_agree(client):
    blob = photo(7)

    def one(_):
        response = client.post("/predict", files={"files": ("a.png", blob, "image/png")})
        return response.status_code, response.json()["predictions"][0]["age"]["value"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(24)))
    assert {status for status, _ in results} == {200}
    assert max(v for _, v in results) - min(v for _, v in results) < 1e-5


def test_page_is_served_and_self_contained(client):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert 'type="file"' in page and "predict" in page
    assert "http://" not in page and "https://" not in page  # no CDN, no external assets


def test_models_that_cannot_be_served_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no such model file"):
        load_model(tmp_path / "missing")
    tabular = mh.MultiHeadNet(nn.Linear(4, 8), {"y": mh.Regression()})
    with pytest.raises(ValueError, match="not an image model"):
        create_app(tabular)

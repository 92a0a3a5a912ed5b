import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import manyheads as mh
from conftest import slow_image_net
from manyheads.batching import Batcher, QueueFull
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


def test_health_and_schema(client, run_dir):
    health = client.get("/health").json()
    assert health == {
        "status": "ok", "backend": "torch", "device": "cpu", "model": str(run_dir), "heads": ["age", "gender", "race"],
        "worker": health["worker"], "queue": {"depth": 0, "capacity": 128, "max_batch": 16, "max_wait_ms": 5.0,
                                              "timeout_s": 10.0},
    }  # fmt: skip
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


def metrics(url: str) -> dict[str, float]:
    """/metrics parsed: sample name with its labels (``name{k=v}``) -> value."""
    text = httpx.get(url + "/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "le")
            key = sample.name + (f"{{{labels}}}" if labels else "")
            if "le" not in sample.labels:
                samples[key] = sample.value
    return samples


def post_one(url: str, blob: bytes) -> httpx.Response:
    return httpx.post(url + "/predict", files={"file": ("a.png", blob, "image/png")}, timeout=60)


def test_concurrent_requests_each_get_their_own_answer_in_shared_batches(tmp_path):
    net = slow_image_net(0.05)
    blobs = [photo(100 + i) for i in range(20)]
    paths = [tmp_path / f"{i}.png" for i in range(20)]
    for path, blob in zip(paths, blobs):
        path.write_bytes(blob)
    expected = net.predict(paths)
    with serve_in_thread(create_app(net, max_batch=8, max_wait_ms=20)) as url:
        with ThreadPoolExecutor(20) as pool:
            responses = list(pool.map(lambda blob: post_one(url, blob), blobs))
        seen = metrics(url)
    assert [r.status_code for r in responses] == [200] * 20
    for i, response in enumerate(responses):
        (entry,) = response.json()["predictions"]
        assert entry["age"]["value"] == pytest.approx(expected["age"][i], abs=1e-4)
        assert entry["race"]["value"] == expected["race"][i] and entry["gender"]["value"] == expected["gender"][i]
    assert len({round(r.json()["predictions"][0]["age"]["value"], 3) for r in responses}) == 20
    assert seen["manyheads_batch_images_sum"] == 20
    assert seen["manyheads_batch_images_count"] < 20  # some requests shared a model run


def test_max_batch_1_runs_each_request_alone():
    sizes = []
    batcher = Batcher(lambda x: list(x), max_batch=1, max_wait_ms=50, on_batch=sizes.append)
    tickets = [batcher.admit(n) for n in (1, 3, 2)]
    futures = [batcher.submit(t, np.arange(t.size) + 10 * i) for i, t in enumerate(tickets)]
    assert [list(f.result(timeout=5)) for f in futures] == [[0], [10, 11, 12], [20, 21]]
    batcher.close()
    assert sizes == [1, 3, 2]  # a request is never split, and never joins another


def test_the_batcher_waits_briefly_only_for_requests_on_their_way():
    sizes = []
    batcher = Batcher(lambda x: list(x), max_batch=8, max_wait_ms=500, on_batch=sizes.append)
    first, second = batcher.admit(1), batcher.admit(2)  # the second is still decoding
    one = batcher.submit(first, np.zeros(1))
    time.sleep(0.1)
    two = batcher.submit(second, np.ones(2))
    assert one.result(timeout=5) == [0] and two.result(timeout=5) == [1, 1]
    start = time.monotonic()
    assert batcher.submit(batcher.admit(1), np.zeros(1)).result(timeout=5) == [0]  # nothing else on its way
    assert time.monotonic() - start < 0.4
    batcher.close()
    assert sizes == [3, 1]


def test_a_full_queue_answers_503_with_retry_after():
    with serve_in_thread(create_app(slow_image_net(0.3), max_batch=1, max_queue=2)) as url:
        with ThreadPoolExecutor(10) as pool:
            responses = list(pool.map(lambda i: post_one(url, photo(i)), range(10)))
        seen = metrics(url)
        assert httpx.get(url + "/health").json()["queue"]["depth"] == 0
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 503}, statuses
    full = [r for r in responses if r.status_code == 503]
    assert all(r.headers["retry-after"] == "1" and "queue is full" in r.json()["detail"] for r in full)
    assert seen["manyheads_shed_total{reason=queue_full}"] == len(full)
    assert seen["manyheads_batch_images_count"] == statuses.count(200)  # a shed request never reaches the model


def test_a_request_past_its_timeout_gets_503_and_leaves_the_queue():
    with serve_in_thread(create_app(slow_image_net(1.0), max_batch=1, timeout_s=0.4)) as url:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post_one, url, photo(1))
            time.sleep(0.2)
            second = pool.submit(post_one, url, photo(2))
            responses = [first.result(), second.result()]
        time.sleep(1.2)  # the first request's model run ends; the second's never starts
        seen = metrics(url)
    for response in responses:
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert "timeout_s=0.4" in response.json()["detail"]
    assert seen["manyheads_shed_total{reason=timeout}"] == 2
    assert seen["manyheads_batch_images_count"] == 1


def test_metrics_count_every_request_by_status(client, url):
    before = metrics(url)
    for i in range(3):
        assert client.post("/predict", files={"file": ("a.png", photo(i), "image/png")}).status_code == 200
    two = [("files", (f"{i}.png", photo(i), "image/png")) for i in range(2)]
    assert client.post("/predict", files=two).status_code == 200
    for _ in range(2):
        assert client.post("/predict", json={"images": []}).status_code == 400
    after = metrics(url)

    def grew(key):
        return after.get(key, 0) - before.get(key, 0)

    assert grew("manyheads_requests_total{status=200}") == 4 and grew("manyheads_requests_total{status=400}") == 2
    total = sum(
        value - before.get(key, 0) for key, value in after.items() if key.startswith("manyheads_requests_total")
    )
    assert total == 6 and grew("manyheads_request_seconds_count") == 6
    assert grew("manyheads_batch_images_sum") == 5  # the 400s never reach the model
    assert after["manyheads_queue_images"] == 0


def test_the_onnx_backend_serves_a_run_folder_without_writing_to_it(client, run_dir):
    files = [("files", (f"{i}.png", photo(20 + i), "image/png")) for i in range(2)]
    before = sorted(p.name for p in run_dir.iterdir())
    with serve_in_thread(create_app(run_dir, backend="onnx")) as base:
        assert httpx.get(base + "/health").json()["backend"] == "onnx"
        from_onnx = httpx.post(base + "/predict", files=files).json()["predictions"]
    assert sorted(p.name for p in run_dir.iterdir()) == before
    from_torch = client.post("/predict", files=files).json()["predictions"]
    for a, b in zip(from_onnx, from_torch):
        assert a["age"]["value"] == pytest.approx(b["age"]["value"], abs=1e-4)


def test_backend_and_device_mistakes_are_one_clear_error(run_dir, tmp_path):
    onnx_path = export_onnx(mh.load(run_dir / "model.safetensors"), tmp_path / "model.onnx")
    with pytest.raises(ValueError, match="served by the onnx backend only"):
        create_app(onnx_path, backend="torch")
    with pytest.raises(ValueError, match="backend must be one of torch, onnx"):
        create_app(run_dir, backend="tensorrt")
    with pytest.raises(ValueError, match="onnx backend runs on the CPU"):
        create_app(onnx_path, device="cuda")
    with pytest.raises(ValueError, match="not a device name"):
        create_app(run_dir, device="gpu please")
    for option, value in (("max_batch", 0), ("max_queue", -1), ("max_wait_ms", -5), ("timeout_s", 0)):
        with pytest.raises(ValueError, match=option):
            create_app(run_dir, **{option: value})
    with pytest.raises(QueueFull, match="shutting down"):
        batcher = Batcher(lambda x: list(x))
        batcher.close()
        batcher.admit(1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_says_so(run_dir):
    with pytest.raises(ValueError, match="CUDA is not available here"):
        create_app(run_dir, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_cuda_serves_the_same_answers(client, run_dir):
    files = [("files", (f"{i}.png", photo(30 + i), "image/png")) for i in range(2)]
    with serve_in_thread(create_app(run_dir, device="cuda")) as base:
        assert httpx.get(base + "/health").json()["device"] == "cuda"
        on_gpu = httpx.post(base + "/predict", files=files).json()["predictions"]
    for a, b in zip(on_gpu, client.post("/predict", files=files).json()["predictions"]):
        assert a["age"]["value"] == pytest.approx(b["age"]["value"], abs=1e-3)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_workers_serve_the_same_answers_as_one(client, run_dir, tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "manyheads", "serve", str(run_dir), "--workers", "2", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "the workers did not answer /health within 120 s"
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        blobs = [photo(40 + i) for i in range(8)]
        with ThreadPoolExecutor(8) as pool:  # new connections: the kernel spreads them over the workers
            from_workers = list(pool.map(lambda blob: post_one(base, blob), blobs))
        from_one = [client.post("/predict", files={"file": ("a.png", b, "image/png")}) for b in blobs]
        for a, b in zip(from_workers, from_one):
            assert a.status_code == b.status_code == 200
            assert a.json()["predictions"][0]["age"]["value"] == pytest.approx(
                b.json()["predictions"][0]["age"]["value"], abs=1e-5
            )
            race, race_one = a.json()["predictions"][0]["race"], b.json()["predictions"][0]["race"]
            assert race["value"] == race_one["value"]
            assert race["probabilities"] == pytest.approx(race_one["probabilities"], abs=1e-5)
        seen = metrics(base)  # every worker's counts, added up (prometheus-client's multiprocess mode)
        assert seen["manyheads_requests_total{status=200}"] == 8
        assert seen["manyheads_batch_images_sum"] == 8
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_the_serve_command_passes_its_options_and_refuses_bad_ones_in_one_line(run_dir, monkeypatch, capsys):
    from manyheads.cli import main

    calls = []
    monkeypatch.setattr("manyheads.serving.serve", lambda model, **kw: calls.append((model, kw)))
    flags = ["--workers", "2", "--backend", "onnx", "--device", "cpu", "--max-batch", "32", "--max-wait-ms", "2",
             "--max-queue", "64", "--timeout-s", "3"]  # fmt: skip
    assert main(["serve", str(run_dir), *flags]) == 0
    assert calls.pop() == (run_dir / "model.safetensors", {
        "host": "127.0.0.1", "port": 8000, "docs": False, "workers": 2, "backend": "onnx", "device": "cpu",
        "max_batch": 32, "max_wait_ms": 2.0, "max_queue": 64, "timeout_s": 3.0,
    })  # fmt: skip
    monkeypatch.undo()
    bad = [(["--workers", "0"], "workers must be a positive integer"), (["--max-batch", "0"], "max_batch must be")]
    if not torch.cuda.is_available():
        bad.append((["--device", "cuda"], "CUDA is not available here"))
    for flag, words in bad:
        assert main(["serve", str(run_dir), *flag]) == 2
        err = capsys.readouterr().err
        assert err.startswith("manyheads: error: ") and words in err and err.count("\n") == 1, err

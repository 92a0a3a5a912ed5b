"""The try-it page in headless Chromium: choose a photo, see every head rendered."""

import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import slow_image_net
from manyheads.serving import create_app, serve_in_thread

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
RACES = ["White", "Black", "Asian", "Indian", "Others"]

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="needs Playwright for Python: pip install playwright (uses the system chromium)"
)
if not os.path.exists(CHROMIUM):
    pytest.skip(f"needs {CHROMIUM}: apt-get install -y chromium", allow_module_level=True)


@pytest.fixture(scope="module")
def url():
    with serve_in_thread(create_app(slow_image_net())) as base:
        yield base


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser.new_page()
        browser.close()


def test_a_chosen_photo_shows_every_head(page, url, tmp_path):
    photo = tmp_path / "face.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (60, 50, 3), dtype=np.uint8)).save(photo)
    expected = httpx.post(url + "/predict", files={"file": photo.read_bytes()}).json()["predictions"][0]

    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('regression')")
    page.set_input_files("#file", str(photo))
    page.wait_for_selector('[data-head="race"]', timeout=15_000)

    assert page.locator("#preview").evaluate("img => img.src.startsWith('blob:')")
    assert page.locator(".head").evaluate_all("cards => cards.map(c => c.dataset.head)") == ["age", "gender", "race"]
    age = page.locator('[data-head="age"] .value').inner_text()
    assert age == f"{expected['age']['value']:.1f}"
    assert page.locator('[data-head="age"] .bar').count() == 0
    for name in ("gender", "race"):
        card = page.locator(f'[data-head="{name}"]')
        assert card.locator(".value").inner_text() == expected[name]["value"]
        bars = card.locator(".bar")
        assert bars.evaluate_all("bs => bs.map(b => b.dataset.label)") == list(expected[name]["probabilities"])
        for label, p in expected[name]["probabilities"].items():
            bar = card.locator(f'.bar[data-label="{label}"]')
            assert bar.locator(".pct").inner_text() == f"{100 * p:.1f}%"
            width = bar.locator(".fill").evaluate("f => parseFloat(f.style.width)")
            assert width == pytest.approx(100 * p, abs=0.05)
        assert card.locator(".bar.top").evaluate("b => b.dataset.label") == expected[name]["value"]


def test_a_file_that_is_not_an_image_shows_the_error(page, url):
    page.goto(url + "/")
    page.set_input_files("#file", {"name": "fake.png", "mimeType": "image/png", "buffer": b"not really a png"})
    page.wait_for_selector("#status.error", timeout=15_000)
    assert "not an image" in page.locator("#status").inner_text()
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(buffer, "PNG")
    page.set_input_files("#file", {"name": "red.png", "mimeType": "image/png", "buffer": buffer.getvalue()})
    page.wait_for_selector("#status:not(.error)", timeout=15_000)
    page.wait_for_selector('[data-head="gender"] .bar.top', timeout=15_000)


def random_png(path, seed: int):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (60, 50, 3), dtype=np.uint8)).save(path)
    return path


def shown_age(page, photo) -> str:
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#status:text('done')", timeout=30_000)
    return page.locator('[data-head="age"] .value').inner_text()


def test_the_page_gets_its_own_answer_while_the_batcher_is_busy(page, tmp_path):
    net = slow_image_net(0.05)
    photo = random_png(tmp_path / "mine.png", 5)
    expected = f"{net.predict([photo])['age'][0]:.1f}"
    others = [random_png(tmp_path / f"other{i}.png", 50 + i).read_bytes() for i in range(4)]
    with serve_in_thread(create_app(net, max_batch=4, max_wait_ms=20)) as base:
        stop = threading.Event()

        def load(blob: bytes) -> int:
            sent = 0
            with httpx.Client(base_url=base, timeout=30) as client:
                while not stop.is_set():
                    sent += client.post("/predict", files={"file": ("o.png", blob, "image/png")}).status_code == 200
            return sent

        page.goto(base + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('regression')")
        with ThreadPoolExecutor(4) as pool:
            busy = [pool.submit(load, blob) for blob in others]
            time.sleep(0.3)
            age = shown_age(page, photo)
            stop.set()
            assert all(future.result() > 0 for future in busy)
        batches = httpx.get(base + "/metrics").text
    assert age == expected
    assert "manyheads_batch_images_bucket" in batches


def wait_until(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the service never got there"
        time.sleep(0.02)


def test_the_page_waits_and_retries_when_the_queue_is_full(page, tmp_path):
    photo = random_png(tmp_path / "mine.png", 6)
    blob = random_png(tmp_path / "other.png", 7).read_bytes()
    net = slow_image_net(2.0)
    expected = f"{net.predict([photo])['age'][0]:.1f}"
    with serve_in_thread(create_app(net, max_batch=1, max_queue=1)) as base:
        page.goto(base + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('regression')")
        with ThreadPoolExecutor(2) as pool:  # one request runs, one waits: the queue is full until the first ends
            busy = [pool.submit(httpx.post, base + "/predict", files={"file": blob}, timeout=30)]
            wait_until(lambda: "manyheads_batch_images_count 1.0" in httpx.get(base + "/metrics").text)
            busy.append(pool.submit(httpx.post, base + "/predict", files={"file": blob}, timeout=30))
            wait_until(lambda: httpx.get(base + "/health").json()["queue"]["depth"] == 1)
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("#status:text('busy')", timeout=10_000)
            page.wait_for_selector("#status:text('done')", timeout=30_000)
            assert [future.result().status_code for future in busy] == [200, 200]
        shed = httpx.get(base + "/metrics").text
    assert page.locator('[data-head="age"] .value').inner_text() == expected
    assert 'manyheads_shed_total{reason="queue_full"} 0.0' not in shed


def test_a_calibrated_model_shows_the_interval_and_the_uncertain_mark(page, tmp_path):
    net = slow_image_net()
    values = torch.linspace(0, 80, 400)
    net.heads["age"].calibrate(values, values + torch.randn(400, generator=torch.Generator().manual_seed(0)) * 5,
                               coverage=0.8)  # fmt: skip
    net.heads["gender"].calibrate(torch.randn(400), torch.randint(0, 2, (400,)).float(), abstain=0.9999)
    photo = tmp_path / "face.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(photo)
    with serve_in_thread(create_app(net)) as base:
        expected = httpx.post(base + "/predict", files={"file": photo.read_bytes()}).json()["predictions"][0]
        page.goto(base + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('regression')")
        page.set_input_files("#file", str(photo))
        page.wait_for_selector('[data-head="race"]', timeout=15_000)
        low, high = expected["age"]["interval"]
        shown = page.locator('[data-head="age"] .interval').inner_text()
        assert shown == f"80 % interval: {low:.1f} – {high:.1f}"
        assert expected["gender"]["uncertain"] is True
        assert "uncertain" in page.locator('[data-head="gender"] .uncertain').inner_text()
        assert page.locator('[data-head="race"] .interval, [data-head="race"] .uncertain').count() == 0

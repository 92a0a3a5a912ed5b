"""The try-it page in headless Chromium: choose a photo, see every head rendered."""

import io
import os

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import manyheads as mh
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


def tiny_net() -> mh.MultiHeadNet:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    heads = {"age": mh.Regression(), "gender": mh.Binary(["male", "female"]), "race": mh.Categorical(RACES)}
    net = mh.MultiHeadNet(trunk, heads, image_size=32).eval()
    net(torch.zeros(1, 3, 32, 32))
    with torch.no_grad():
        for layer in net.head_layers.values():
            layer.linear.weight.mul_(30)  # spread the probabilities so the bars differ
        net.head_layers["age"].center.fill_(40.0)
    return net


@pytest.fixture(scope="module")
def url():
    with serve_in_thread(create_app(tiny_net())) as base:
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

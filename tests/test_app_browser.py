"""The demo in a real browser: Debian's chromium driven by playwright (python).

Loads the page, checks that a request without a photo shows an error message, uploads a photo,
ranks captions, checks the ranked table, the breakdown plot and the attention heatmaps; then
searches photos by caption, checks the ranked gallery and plot, and explains another match.
Screenshots go to tmp_path.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.app_server import ROOT, find_model, running_app

CHROMIUM = Path("/usr/bin/chromium")
MODEL, SKIP_REASON = find_model()
pytestmark = [
    pytest.mark.app,
    pytest.mark.browser,
    pytest.mark.skipif(MODEL is None, reason=SKIP_REASON),
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="/usr/bin/chromium is absent (install Debian's chromium: apt-get install -y chromium)"),
]
playwright_sync = pytest.importorskip("playwright.sync_api")

LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 90_000


def _photo() -> Path:
    photos = sorted(p for p in (ROOT / "examples" / "images").glob("*") if p.suffix.lower() in {".jpg", ".png"})
    if not photos:
        pytest.skip("no example photos in examples/images")
    return photos[0]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    with running_app(MODEL, tmp_path_factory.mktemp("app") / "app.log") as url:
        yield url


@pytest.fixture()
def page(app_url):
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(app_url)
            page.wait_for_selector("#rank-captions")
            yield page
        finally:
            browser.close()


def _screenshot(page, path: Path) -> None:
    """Save a full-page screenshot; also copy it to $TSHSR_SCREENSHOT_DIR for a person to look at."""
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    keep = os.environ.get("TSHSR_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)


def _image_loaded(locator) -> bool:
    return bool(locator.evaluate("img => img.complete && img.naturalWidth > 0"))


def test_image_to_captions_in_the_browser(page, tmp_path) -> None:
    # No photo yet: an error toast with a message, and the page keeps working.
    page.click("#rank-captions")
    toast = page.locator("[data-testid='toast-text']").first
    toast.wait_for()
    assert "Upload a photo" in toast.inner_text()

    # A broken file: the server refuses it with a message (not a traceback) and keeps serving.
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    page.set_input_files("#photo-input input[type=file]", str(broken))
    page.click("#rank-captions")
    page.locator("[data-testid='toast-text']", has_text="Not a readable image").first.wait_for()

    page.set_input_files("#photo-input input[type=file]", str(_photo()))
    page.locator("#photo-input img").first.wait_for()
    page.fill("#extra-captions textarea", "a zebra plays chess on the moon")
    page.click("#rank-captions")
    plot = page.locator("#captions-plot img").first
    plot.wait_for()
    assert _image_loaded(plot), "the breakdown plot did not render"
    grid = page.locator("#ranked-captions [role=grid]")
    assert grid.get_attribute("aria-rowcount") == "6"  # a header and the default top K of 5
    table_text = grid.inner_text()
    assert "built-in" in table_text or "yours" in table_text
    maps = page.locator("#captions-word-maps img")
    maps.first.wait_for()
    assert maps.count() >= 2 and _image_loaded(maps.first), "no word heatmaps"
    _screenshot(page, tmp_path / "image_to_captions.png")


def test_caption_to_images_in_the_browser(page, tmp_path) -> None:
    page.get_by_role("tab", name="Caption → images").click()
    # Add a photo of this session to the gallery: it is encoded once and ranked with the others.
    mine = tmp_path / "my_red_square.png"
    Image.new("RGB", (120, 90), (220, 30, 30)).save(mine)
    page.set_input_files("#add-photos-files input[type=file]", str(mine))
    page.locator("#add-photos-files td[aria-label='my_red_square.png']").wait_for()  # uploaded
    page.click("#add-photos")
    page.wait_for_function("() => document.querySelector('#upload-status').innerText.includes('Added 1')")
    counts = re.search(r"(\d+) built-in \+ (\d+) of yours", page.locator("#upload-status").inner_text())
    assert counts and int(counts.group(2)) == 1
    gallery_size = int(counts.group(1)) + 1

    page.fill("#query-caption textarea", "a dog standing in the woods")
    page.click("#rank-images")
    plot = page.locator("#images-plot img").first
    plot.wait_for()
    assert _image_loaded(plot), "the breakdown plot did not render"
    thumbs = page.locator("#ranked-images img")
    thumbs.first.wait_for()
    assert thumbs.count() == 8  # the default top K of this tab
    header = page.locator("#explain-header")
    assert "#1" in header.inner_text()
    assert f"of {gallery_size} photos ranked" in header.inner_text(), "the added photo was not ranked"
    thumbs.nth(1).click()  # explain the second match
    page.wait_for_function("() => document.querySelector('#explain-header').innerText.includes('#2')")
    _screenshot(page, tmp_path / "caption_to_images.png")

"""`lcm-edge serve` in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright
against the server started as a user starts it, on the default model.

If the browser cannot start, the test fails and says so: a UI test that skips proves nothing.
Set LCM_EDGE_SCREENSHOT_DIR to keep the screenshot (docs/images/serve.png is made that way).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import pytest

import lcm_edge

# Not skipped when missing: [dev] installs both, and a UI test that skips proves nothing.
from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
# Offline machine: no background connections, no sandbox as root, a fresh profile per run.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SERVER_START_TIMEOUT_S = 90
GENERATION_TIMEOUT_MS = 120_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lcm_edge", "serve", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"lcm-edge serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"lcm-edge serve did not answer on {url} in {SERVER_START_TIMEOUT_S} s:\n{log.read_text()}")
            time.sleep(0.5)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def page(server):
    url, _log = server
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        except Exception as exc:  # noqa: BLE001 - any launch failure must fail this test with its reason
            pytest.fail(f"headless Chromium ({CHROMIUM}) could not start, so the web UI was not tested: {exc}. "
                        "Fix: apt-get install -y chromium")
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.wait_for_selector("#generate", timeout=60_000)
            yield page
        finally:
            browser.close()


def _set(page, field: str, value) -> None:
    box = page.locator(f"#{field} input, #{field} textarea").first
    box.fill(str(value))
    box.press("Tab")  # Gradio reads the value on blur/change


def _generate(page) -> str:
    """Click Generate; the status line the run ends with (a new one: the previous run's does not count)."""
    before = page.locator("#status").inner_text()
    page.click("#generate")
    page.wait_for_function(
        """(before) => { const t = document.querySelector('#status').innerText.trim();
                         return t !== before.trim() && /^(Done:|Error:|Cancelled)/.test(t); }""",
        arg=before, timeout=GENERATION_TIMEOUT_MS)
    return page.locator("#status").inner_text().strip()


def test_generate_shows_a_16_frame_clip(page, tmp_path):
    _set(page, "prompt", "a blue square moving up")
    page.locator("#random_seed input").uncheck()
    _set(page, "seed", 7)
    text = _generate(page)
    assert text.startswith("Done: 16 frames at 64x64, seed 7"), text
    assert page.locator("#seed_used textarea").input_value() == "7"
    assert "unet" in page.locator("#timings textarea").input_value()
    # The clip the page shows, fetched as the browser fetched it, decodes to 16 frames.
    src = page.locator("#clip img").get_attribute("src")
    response = page.request.get(src)
    assert response.ok, src
    clip = tmp_path / "served.gif"
    clip.write_bytes(response.body())
    ok, animation = cv2.imreadanimation(str(clip))
    assert ok and len(animation.frames) == 16, (src, ok)
    assert animation.frames[0].shape[:2] == (64, 64)
    # Both files are offered for download.
    links = page.locator("#files a")
    names = {links.nth(i).get_attribute("href") for i in range(links.count())}
    assert any(n.endswith(".mp4") for n in names) and any(n.endswith(".gif") for n in names), names
    shot = tmp_path / "serve.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("LCM_EDGE_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["LCM_EDGE_SCREENSHOT_DIR"]) / "serve.png")


def test_cancel_stops_a_running_generation(page):
    # The most steps the bundle takes, on 32 frames at 96x96: long enough to press Cancel between two steps.
    steps = lcm_edge.load_bundle(lcm_edge.default_bundle_path(), verify_checksums=False) \
        .scheduler_config.original_inference_steps
    for field, value in (("frames", 32), ("height", 96), ("width", 96), ("steps", steps)):
        _set(page, field, value)
    # Cancel as soon as the progress bar shows a UNet step; the status says where the run stopped.
    page.locator("#cancel").evaluate("""(button) => {
        const observer = new MutationObserver(() => {
            if (/UNet step \\d+\\//.test(document.body.innerText)) { observer.disconnect(); button.click(); }
        });
        observer.observe(document.body, {subtree: true, childList: true, characterData: true});
    }""")
    text = _generate(page)
    match = re.match(rf"Cancelled during UNet step (\d+)/{steps}", text)
    assert match and int(match.group(1)) < steps, text
    for field, value in (("frames", 16), ("height", 64), ("width", 64), ("steps", 4)):
        _set(page, field, value)


def test_bad_argument_shows_the_fix_not_a_traceback(page, server):
    model = lcm_edge.load_bundle(lcm_edge.default_bundle_path(), verify_checksums=False).model
    _set(page, "frames", model.max_frames + 1)
    text = _generate(page)
    assert text.startswith(f"Error: Frames: {model.max_frames + 1} is outside [1, {model.max_frames}]. Fix:"), text
    assert "Traceback" not in page.content()
    _url, log = server
    assert "Traceback" not in log.read_text()

"""`lcm-edge serve` in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright
against the server started as a user starts it, on the default model.

If the browser cannot start, the test fails and says so: a UI test that skips proves nothing.
Set LCM_EDGE_SCREENSHOT_DIR to keep the screenshot (docs/images/serve.png is made that way).
"""

from __future__ import annotations

import importlib.util
import json
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


def _bundle_without_tiny_decoder(folder: Path) -> Path:
    """The default model with its optional tiny decoder dropped from the manifest (as bundles exported
    without one have it)."""
    shutil.copytree(lcm_edge.default_bundle_path(), folder)
    manifest = json.loads((folder / "bundle.json").read_text())
    del manifest["components"]["vae_decoder_tiny"]
    (folder / "bundle.json").write_text(json.dumps(manifest))
    return folder


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
    """Click Generate; the status line this run ends with. The page shows "Working..." when the run starts; an
    observer notes the first final line after it (so a previous run's line, even an identical one, never counts)."""
    page.locator("#status").evaluate("""(status) => {
        window.__final = null;
        let started = false;
        const observer = new MutationObserver(() => {
            const text = status.innerText.trim();
            if (text.startsWith("Working")) started = true;
            else if (started && /^(Done:|Error:|Cancelled)/.test(text)) { window.__final = text; observer.disconnect(); }
        });
        observer.observe(status, {subtree: true, childList: true, characterData: true});
    }""")
    page.click("#generate")
    page.wait_for_function("() => window.__final !== null", timeout=GENERATION_TIMEOUT_MS)
    return page.evaluate("() => window.__final")


def test_generate_shows_a_16_frame_clip(page, tmp_path):
    _set(page, "prompt", "a blue square moving up")
    page.locator("#random_seed input").uncheck()
    _set(page, "seed", 7)
    text = _generate(page)
    assert text.startswith("Done: 16 frames at 64x64, seed 7"), text
    assert page.locator("#seed_used textarea").input_value() == "7"
    assert "unet" in page.locator("#timings textarea").input_value()
    # The default model has a tiny decoder: the live preview showed the clip forming.
    assert page.locator("#preview img").is_visible() and page.locator("#preview img").get_attribute("src")
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
    # Cancel as soon as the progress bar shows a UNet step of this run; the status says where the run stopped.
    page.locator("#cancel").evaluate("""(button, steps) => {
        const shown = new RegExp(`UNet step \\\\d+/${steps}`);
        const observer = new MutationObserver(() => {
            if (shown.test(document.body.innerText)) { observer.disconnect(); button.click(); }
        });
        observer.observe(document.body, {subtree: true, childList: true, characterData: true});
    }""", steps)
    text = _generate(page)
    # "during UNet step k/N" (before step k ran), or during a step's preview decode "after UNet step k/N".
    match = re.match(rf"Cancelled during (UNet step (\d+)/{steps}|.*, after UNet step (\d+)/{steps})\.$", text)
    assert match, text
    done = int(match.group(2)) - 1 if match.group(2) else int(match.group(3))
    assert done < steps, text
    print(f"[serve] {text}")
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


def _choose(page, field: str, value: str) -> None:
    page.locator(f"#{field} input").click()
    page.get_by_role("option", name=value, exact=True).click()


def test_guidance_enables_the_negative_prompt_and_backends_are_what_is_installed(page):
    negative = page.locator("#negative textarea")
    assert negative.is_disabled()  # guidance 1: AnimateLCM's CFG-free sampling has no negative prompt
    _set(page, "guidance", 1.5)
    negative.wait_for(state="visible")
    page.wait_for_function("() => !document.querySelector('#negative textarea').disabled")
    negative.fill("a red circle")
    for field, value in (("frames", 8), ("steps", 2)):
        _set(page, field, value)
    page.locator("#backend input").click()
    offered = {o.inner_text().replace("✓", "").strip() for o in page.get_by_role("option").all()}  # ✓ marks the chosen
    expected = {"onnxruntime"} | ({"openvino"} if importlib.util.find_spec("openvino") else set())
    assert offered == expected, offered  # what this machine has installed, nothing else
    backend = "openvino" if "openvino" in offered else "onnxruntime"
    page.get_by_role("option", name=backend, exact=True).click()
    text = _generate(page)
    assert text.startswith("Done: 8 frames") and backend in text.lower(), text
    _set(page, "guidance", 1)
    _choose(page, "backend", "onnxruntime")


def test_two_users_at_once_are_queued(page, server):
    """A second browser session generating while the first does: both get their clip (one waits in the queue)."""
    url, log = server
    context = page.context.browser.new_context()  # another user: own cookies and Gradio session
    other = context.new_page()
    try:
        other.goto(url)
        other.wait_for_selector("#generate", timeout=60_000)
        _set(page, "frames", 8)
        _set(other, "frames", 8)
        for p in (page, other):
            p.locator("#status").evaluate("(s) => { window.__done = null; new MutationObserver(() => { "
                                          "if (/^(Done:|Error:|Cancelled)/.test(s.innerText.trim())) "
                                          "window.__done = s.innerText.trim(); }).observe(s, {subtree: true, "
                                          "childList: true, characterData: true}); }")
        page.click("#generate")
        other.click("#generate")
        for p in (page, other):
            p.wait_for_function("() => window.__done !== null", timeout=GENERATION_TIMEOUT_MS)
            assert p.evaluate("() => window.__done").startswith("Done: 8 frames"), p.evaluate("() => window.__done")
    finally:
        context.close()
    assert "Traceback" not in log.read_text()


@pytest.mark.filterwarnings("ignore::lcm_edge.PromptTruncatedWarning")  # the long prompt's, read from the result
def test_serve_app_without_a_browser(tmp_path):
    """ServeApp's contract under the UI: previews per step, a cancel pressed before the run stops it at once,
    one warm pipeline per (bundle, backend, device), bad input as the field's message."""
    from lcm_edge.serve import DEFAULT_BUNDLE_CHOICE, ServeApp

    plain = _bundle_without_tiny_decoder(tmp_path / "plain")
    app = ServeApp([plain], output_dir=tmp_path / "clips")
    try:
        events = []
        shown = app.generate("s", "a red circle moving right", "", 8, 64, 64, 2, 1.0, "3", False, "onnxruntime",
                             "cpu", DEFAULT_BUNDLE_CHOICE, preview=True,
                             on_event=lambda kind, payload: events.append((kind, payload)))
        assert shown["status"].startswith("Done: 8 frames at 64x64, seed 3"), shown
        steps = [payload for kind, payload in events if kind == "step"]
        assert [s.step for s in steps] == [0, 1] and all(s.preview.shape == (8, 64, 64, 3) for s in steps)
        ok, animation = cv2.imreadanimation(shown["clip"])
        assert ok and len(animation.frames) == 8

        long_prompt = "a red circle moving right " + "and then a blue square moving up " * 4
        shown = app.generate("s", long_prompt, "", 4, 64, 64, 1, 1.0, "", True, "onnxruntime", "cpu",
                             DEFAULT_BUNDLE_CHOICE)
        assert "The prompt was too long; the text encoder did not see: '" in shown["status"], shown

        app.cancels.arm("s")
        app.cancels.cancel("s")  # pressed while the run waited in the queue
        shown = app.generate("s", "a red circle moving right", "", 8, 64, 64, 2, 1.0, "", True, "onnxruntime", "cpu",
                             DEFAULT_BUNDLE_CHOICE)
        assert shown["status"] == "Cancelled during text encoding." and shown["clip"] is None

        app.cancels.arm("s")
        shown = app.generate("s", "a red circle moving right", "ignored without guidance", 4, 64, 64, 1, 1.0, "x", False,
                             "onnxruntime", "cpu", DEFAULT_BUNDLE_CHOICE)
        assert shown["status"] == "Error: Seed: 'x' is not an integer. Fix: use a non-negative integer seed, or None " \
                                  "for a random one", shown
        shown = app.generate("s", "a red circle moving right", "", 4, 60, 64, 1, 1.0, "", True, "onnxruntime", "cpu",
                             DEFAULT_BUNDLE_CHOICE)
        assert shown["status"].startswith("Error: Height: 60 is not a multiple of 16"), shown
        shown = app.generate("s", "a red circle", "", 4, 64, 64, 1, 1.0, "", True, "onnxruntime", "cpu",
                             str(tmp_path / "missing"))
        assert shown["status"].startswith("Error: bundle: folder"), shown
        shown = app.generate("s", "a red circle", "", 4, 64, 64, 1, 1.0, "", True, "onnxruntime", "cpu", str(plain),
                             preview=True)
        assert shown["status"].startswith("Error: Live preview: the bundle"), shown  # no tiny decoder there
        shown = app.generate("s", "a red circle", "", 4, 64, 64, 1, 1.0, "", True, "onnxruntime", "cpu", str(plain))
        assert shown["status"].startswith("Done: 4 frames"), shown
        assert len(app.pipelines._pipelines) == 2  # the two bundles, each compiled once
    finally:
        app.close()

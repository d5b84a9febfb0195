"""examples/desktop_app.py on a virtual X screen (Debian's Xvfb, started here): start the window, generate a clip
with the default model, cancel a second run mid-way, close.

The window is driven in a child process (one QApplication per process; Qt's xcb platform on the Xvfb display);
the test reads what it reports. Without Xvfb the test fails and says so. Set LCM_EDGE_SCREENSHOT_DIR to keep the
screenshot (docs/images/desktop.png is made that way).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "desktop_app.py"
XVFB = shutil.which("Xvfb")
DRIVER_TIMEOUT_S = 240

# Runs in the child: drives the example's window with real clicks and reports one JSON line.
DRIVER = r"""
import importlib.util, json, sys, time
from pathlib import Path
from PySide6.QtCore import Qt
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QApplication

spec = importlib.util.spec_from_file_location("desktop_app", sys.argv[1])
desktop_app = importlib.util.module_from_spec(spec)
spec.loader.exec_module(desktop_app)
out, shot = Path(sys.argv[2]), Path(sys.argv[3])
app = QApplication([])
window = desktop_app.MainWindow(out_dir=out)
window.show()
report = {"platform": app.platformName()}

def wait(condition, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            window.close()  # stops the worker thread, so the process exits with this message, not an abort
            raise SystemExit(f"timed out waiting for {what}; status: {window.status.text()}")
        app.processEvents()
        time.sleep(0.01)

wait(lambda: window.status.text().startswith(("Ready", "Error")), "the model to load")
report["loaded"] = window.status.text()

window.prompt.setText("a yellow triangle moving down")
window.random_seed.setChecked(False)
window.seed.setText("5")
QTest.mouseClick(window.generate_button, Qt.MouseButton.LeftButton)
wait(lambda: window.status.text().startswith(("Saved", "Error", "Cancelled")), "the clip")
report["generated"] = window.status.text()
report["previews_shown"] = window.previews_shown
report["clip"] = str(window.last_clip)
wait(lambda: window.clip.movie() is not None and window.clip.movie().frameCount() > 0, "the clip to play", 10)
report["movie_frames"] = window.clip.movie().frameCount()
window.grab().save(str(shot))

# A long run (most frames and steps), cancelled by a click as soon as the first step is reported.
window.frames.setValue(window.frames.maximum())
window.steps.setValue(window.steps.maximum())
window.progress.valueChanged.connect(
    lambda value: value >= 1 and QTest.mouseClick(window.cancel_button, Qt.MouseButton.LeftButton))
QTest.mouseClick(window.generate_button, Qt.MouseButton.LeftButton)
wait(lambda: window.status.text().startswith(("Saved", "Error", "Cancelled")), "the cancelled run")
report["cancelled"] = window.status.text()
report["steps"] = window.steps.value()
report["generate_enabled_after_cancel"] = window.generate_button.isEnabled()

window.close()
report["thread_stopped"] = window._thread.isFinished()
print("REPORT " + json.dumps(report), flush=True)
"""


@pytest.fixture()
def display():
    if XVFB is None:
        pytest.fail("Xvfb is not installed, so the desktop example was not tested. Fix: apt-get install -y xvfb")
    # -displayfd: Xvfb picks a free display number and writes it to us once it accepts clients.
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen([XVFB, "-displayfd", str(write_fd), "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
                            pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd) as ready:
            number = ready.readline().strip()
        if not number:
            pytest.fail(f"Xvfb did not start: {proc.stderr.read().decode(errors='replace')[-2000:]}")
        yield f":{number}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_desktop_example_generates_cancels_and_closes(display, tmp_path):
    shot = tmp_path / "desktop.png"
    env = dict(os.environ, DISPLAY=display, QT_QPA_PLATFORM="xcb", OMP_NUM_THREADS="1")
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-c", DRIVER, str(EXAMPLE), str(tmp_path), str(shot)], env=env,
                         capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S, cwd=tmp_path)
    lines = [line for line in run.stdout.splitlines() if line.startswith("REPORT ")]
    assert run.returncode == 0 and lines, f"exit {run.returncode} after {time.monotonic() - started:.0f} s\n" \
                                          f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    report = json.loads(lines[0][len("REPORT "):])
    assert report["platform"] == "xcb", report  # a real X client, not the offscreen platform
    assert report["loaded"].startswith("Ready"), report
    assert report["generated"].startswith(f"Saved {tmp_path / 'clip-5.gif'} (seed 5)"), report
    ok, animation = cv2.imreadanimation(report["clip"])
    assert ok and len(animation.frames) == 16 and report["movie_frames"] == 16, report
    stopped = re.match(r"Cancelled during .*, after UNet step (\d+)/(\d+)\.$", report["cancelled"])
    assert stopped and int(stopped.group(1)) < int(stopped.group(2)) == report["steps"], report
    assert report["previews_shown"] == 4, report  # the default model's tiny decoder: one preview per step
    assert report["generate_enabled_after_cancel"] and report["thread_stopped"], report
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert shot.stat().st_size > 5_000
    if os.environ.get("LCM_EDGE_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["LCM_EDGE_SCREENSHOT_DIR"]) / "desktop.png")

"""A small Qt (PySide6) window that makes clips with lcm_edge: the pattern to copy into a desktop app.

    pip install lcm-edge PySide6-Essentials
    python examples/desktop_app.py [--bundle DIR] [--out DIR]

What it shows:
- the pipeline is compiled and every generation runs on one worker thread (QThread), so the window never
  freezes; the worker talks to the window only through Qt signals (queued across threads);
- progress per UNet step from the pipeline's `callback` (a StepInfo after each step), and with preview=True
  (bundles with a tiny decoder, as the default model) the clip as it forms, shown while it samples;
- Cancel sets a `threading.Event` passed as `cancel_event`; the pipeline checks it before each step and
  the decode and raises `GenerationCancelled`, so the run stops within one step;
- the arguments are checked with `check_inputs` on the window's thread before a thread is started, and
  an `LcmEdgeError` is shown as its message (which names the argument and the fix);
- the clip is saved with `GenerationResult.save` (complete files only) and played with QMovie.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path
from typing import Callable

from PySide6.QtCore import QObject, Qt, QThread, Signal, Slot
from PySide6.QtGui import QImage, QMovie, QPixmap
from PySide6.QtWidgets import (QApplication, QCheckBox, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QMainWindow,
                               QProgressBar, QPushButton, QSpinBox, QVBoxLayout, QWidget)

import numpy as np

import lcm_edge
from lcm_edge.pipeline import DECODERS, check_inputs


class Worker(QObject):
    """Lives on the window's worker thread; runs one `work(on_step, cancel_event)` at a time."""

    progress = Signal(int, int)  # steps done, steps in all
    preview = Signal(object)  # uint8 (frames, height, width, 3): the clip as it forms (tiny decoder)
    done = Signal(object)  # work's return value
    failed = Signal(str)  # an LcmEdgeError's message
    cancelled = Signal(str)  # where the run stopped

    @Slot(object, object)
    def run(self, work: Callable, cancel_event: threading.Event) -> None:
        try:
            value = work(self.step_callback, cancel_event)
        except lcm_edge.GenerationCancelled as exc:
            self.cancelled.emit(exc.stage)
        except lcm_edge.LcmEdgeError as exc:
            self.failed.emit(str(exc))
        else:
            self.done.emit(value)

    def step_callback(self, info: lcm_edge.StepInfo) -> None:
        # Runs on the worker thread: only signals cross to the window.
        if info.preview is not None:
            self.preview.emit(info.preview)
        self.progress.emit(info.step + 1, info.num_steps)


class MainWindow(QMainWindow):
    _run = Signal(object, object)  # (work, cancel_event) to the worker

    def __init__(self, bundle: Path | None = None, out_dir: Path = Path(".")):
        super().__init__()
        self.setWindowTitle("lcm-edge desktop example")
        self.setMinimumWidth(520)
        self.out_dir = Path(out_dir)
        self.pipeline: lcm_edge.AnimateLCMPipeline | None = None
        self._cancel = threading.Event()
        self._on_done: Callable = lambda _value: None
        # One worker thread for the window's life: the pipeline is used from it only.
        self._thread = QThread(self)
        self._worker = Worker()
        self._worker.moveToThread(self._thread)
        self._run.connect(self._worker.run)  # queued: the call crosses to the worker thread
        self._worker.progress.connect(self._progress)
        self._worker.preview.connect(self._show_preview)
        self._worker.done.connect(lambda value: self._on_done(value))
        self._worker.failed.connect(lambda message: self._finish(f"Error: {message}"))
        self._worker.cancelled.connect(lambda stage: self._finish(
            f"Cancelled during {stage}, after UNet step {self.progress.value()}/{self.progress.maximum()}."))
        self._thread.start()
        self.last_clip: Path | None = None
        self.previews_shown = 0

        self.prompt = QLineEdit(lcm_edge.default.DEFAULT_PROMPT)
        self.frames = QSpinBox()
        self.steps = QSpinBox()
        self.seed = QLineEdit("0")  # text: seeds go up to 2**63
        self.random_seed = QCheckBox("random")
        self.live_preview = QCheckBox("live preview (the bundle's tiny decoder)")
        self.generate_button = QPushButton("Generate")
        self.cancel_button = QPushButton("Cancel")
        self.progress = QProgressBar()
        self.status = QLabel("Loading the model...")
        self.status.setWordWrap(True)
        self.status.setMinimumHeight(self.status.fontMetrics().lineSpacing() * 4)  # path + timings, wrapped
        self.clip = QLabel()
        self.clip.setFixedSize(256, 256)
        self.clip.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.clip.setStyleSheet("background: #202020")

        form = QFormLayout()
        form.addRow("Prompt", self.prompt)
        form.addRow("Frames", self.frames)
        form.addRow("Steps", self.steps)
        seed_row = QHBoxLayout()
        seed_row.addWidget(self.seed)
        seed_row.addWidget(self.random_seed)
        form.addRow("Seed", seed_row)
        form.addRow("", self.live_preview)
        buttons = QHBoxLayout()
        buttons.addWidget(self.generate_button)
        buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout()
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.clip, alignment=Qt.AlignmentFlag.AlignCenter)
        central = QWidget()
        central.setLayout(layout)
        self.setCentralWidget(central)

        self.generate_button.clicked.connect(self.generate)
        self.cancel_button.clicked.connect(self.cancel)
        # Compiling a large bundle takes a while: on the worker thread too.
        source = lcm_edge.default_bundle_path() if bundle is None else bundle
        self._start(lambda _on_step, _cancel: lcm_edge.AnimateLCMPipeline.from_bundle(source), self._loaded)

    # ------------------------------------------------------------ threads
    def _start(self, work: Callable, on_done: Callable) -> None:
        self._cancel = threading.Event()  # a fresh one per run: an old Cancel never stops a new run
        self._on_done = on_done
        self._set_busy(True)
        self._run.emit(work, self._cancel)

    def _set_busy(self, busy: bool) -> None:
        self.generate_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)

    @Slot(int, int)
    def _progress(self, done: int, total: int) -> None:
        self.progress.setMaximum(total)
        self.progress.setValue(done)
        self.status.setText(f"UNet step {done}/{total}")

    def _finish(self, message: str) -> None:
        self.status.setText(message)
        self._set_busy(False)

    def _loaded(self, pipeline: lcm_edge.AnimateLCMPipeline) -> None:
        self.pipeline = pipeline
        model, scheduler = pipeline.bundle.model, pipeline.bundle.scheduler_config
        self.frames.setRange(1, model.max_frames)
        self.frames.setValue(model.default_frames)
        self.steps.setRange(1, scheduler.original_inference_steps)
        self.steps.setValue(4)
        has_tiny = DECODERS["tiny"] in pipeline.bundle.components
        self.live_preview.setEnabled(has_tiny)
        self.live_preview.setChecked(has_tiny)
        self._finish(f"Ready: {pipeline.backend.describe()}")

    # ------------------------------------------------------------ actions
    def arguments(self) -> dict:
        seed = None if self.random_seed.isChecked() else self.seed.text().strip()
        return {"prompt": self.prompt.text(), "num_frames": self.frames.value(),
                "num_inference_steps": self.steps.value(), "preview": self.live_preview.isChecked(),
                "seed": int(seed) if seed is not None and seed.isdigit() else seed}

    @Slot()
    def generate(self) -> None:
        if self.pipeline is None:
            self.status.setText("Error: no model is loaded (see the message above)")
            return
        arguments = self.arguments()
        try:
            # Cheap, before the thread gets the run; the callback is the one the run will use.
            check_inputs(self.pipeline.bundle, **arguments, callback=self._worker.step_callback)
        except lcm_edge.LcmEdgeError as exc:
            self.status.setText(f"Error: {exc}")
            return
        self.progress.setValue(0)
        self.status.setText("Working...")
        pipeline = self.pipeline
        self._start(lambda on_step, cancel: pipeline(**arguments, callback=on_step, cancel_event=cancel),
                    self._generated)

    @Slot(object)
    def _show_preview(self, frames) -> None:
        frame = np.ascontiguousarray(frames[len(frames) // 2])  # the middle frame
        height, width, _ = frame.shape
        image = QImage(frame.data, width, height, 3 * width, QImage.Format.Format_RGB888).copy()
        self.clip.clear()  # drops the previous clip's movie
        self.clip.setPixmap(QPixmap.fromImage(image).scaled(self.clip.size(), Qt.AspectRatioMode.KeepAspectRatio))
        self.previews_shown += 1

    @Slot()
    def cancel(self) -> None:
        self._cancel.set()

    def _generated(self, result: lcm_edge.GenerationResult) -> None:
        self.last_clip = result.save(self.out_dir / f"clip-{result.seed}.gif")
        movie = QMovie(str(self.last_clip))
        movie.setScaledSize(self.clip.size())
        self.clip.setMovie(movie)
        movie.start()
        self._finish(f"Saved {self.last_clip} (seed {result.seed})\n{result.timings.summary()}")

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        # Stop a running generation and wait for the thread: a QThread destroyed while running aborts the app.
        self.cancel()
        self._thread.quit()  # after the run in progress returns, which the cancel makes within one step
        self._thread.wait()
        super().closeEvent(event)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the shipped model)")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder the clips are saved in")
    args = parser.parse_args(argv)
    app = QApplication(sys.argv[:1])
    window = MainWindow(args.bundle, args.out)
    window.show()
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())

"""`lcm-edge serve`: a local web UI (Gradio) on the public API.

Built only on what an app developer has: `AnimateLCMPipeline`, `check_inputs`, the `StepInfo`
callback, `cancel_event` and `GenerationCancelled`. Gradio is imported only here (the `[app]`
extra), so `import lcm_edge` stays light.

One pipeline per (bundle, backend, device) stays warm for the server's life; generations run one
at a time per server by default (Gradio's queue holds the others and shows their place), because a
generation already uses every core. Every argument goes through `check_inputs` before any graph
is compiled or run; its message (argument and fix) is what the user reads, never a traceback.
"""

# No `from __future__ import annotations`: Gradio reads the `gr.Request` annotations of the handlers.
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue
from typing import Callable

from .backends import BACKENDS
from .bundle import Bundle, load_bundle
from .default import DEFAULT_PROMPT, default_bundle_path
from .errors import BackendError, GenerationCancelled, InvalidArgumentError, LcmEdgeError, MissingExtraError
from .pipeline import DECODERS, AnimateLCMPipeline, StepInfo, check_inputs, create_runtime

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_BUNDLE_CHOICE = "default model"
# How many generations run at once; more only split the same cores.
DEFAULT_CONCURRENCY = 1
# Clips (here and in Gradio's cache) older than this are deleted, so a long-running server does not fill the disk.
CLIP_RETENTION_S = 24 * 3600
# Queued requests beyond this are refused with Gradio's "queue full" message instead of waiting for hours.
MAX_QUEUE = 64

# Small clips shown large, with their pixels kept sharp.
CSS = "#clip img, #preview img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"
# The UI's names for the pipeline's arguments, so an error names the field the user sees.
FIELD_LABELS = {
    "prompt": "Prompt", "negative_prompt": "Negative prompt", "num_frames": "Frames", "height": "Height",
    "width": "Width", "num_inference_steps": "Steps", "guidance_scale": "Guidance", "seed": "Seed",
    "preview": "Live preview", "decoder": "Decoder",
}


def available_devices() -> dict[str, list[str]]:
    """Backend -> devices that are installed and visible on this machine (nothing else is offered).

    The library has no such query yet; this reads the runtimes directly.
    """
    import onnxruntime as ort

    from .backends.ort_backend import PROVIDERS

    installed = set(ort.get_available_providers())
    devices = {"onnxruntime": [short for short, provider in PROVIDERS.items() if provider in installed]}
    try:
        import openvino
    except ImportError:
        return devices  # the [openvino] extra is not installed: not offered
    families = sorted({name.split(".")[0] for name in openvino.Core().available_devices})
    if families:
        devices["openvino"] = families + ["AUTO"]
    return devices


@dataclass
class _Warm:
    pipeline: AnimateLCMPipeline
    lock: threading.Lock  # one generation at a time on one set of compiled graphs


class WarmPipelines:
    """Compiled pipelines by (bundle folder, backend, device), created on first use and kept.

    precision and low_memory are the server's (`lcm-edge serve --precision/--low-memory`), the same for all."""

    def __init__(self, precision: str = "f32", low_memory: bool = False):
        self.precision = precision
        self.low_memory = low_memory
        self._lock = threading.Lock()
        self._bundles: dict[Path, Bundle] = {}
        self._pipelines: dict[tuple[Path, str, str], _Warm] = {}

    def bundle(self, folder: Path) -> Bundle:
        """The verified bundle (checksums read once per server, not per click)."""
        with self._lock:
            if folder not in self._bundles:
                self._bundles[folder] = load_bundle(folder)
            return self._bundles[folder]

    def get(self, folder: Path, backend: str, device: str) -> _Warm:
        key = (folder, backend, device)
        bundle = self.bundle(folder)
        with self._lock:  # two first users of one key compile it once
            if key not in self._pipelines:
                runtime = create_runtime(bundle, backend, device, precision=self.precision,
                                         low_memory=self.low_memory)
                self._pipelines[key] = _Warm(AnimateLCMPipeline(bundle, runtime, low_memory=self.low_memory),
                                             threading.Lock())
            return self._pipelines[key]


class CancelEvents:
    """One cancel event per browser session, armed fresh for each generation."""

    def __init__(self):
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}

    def arm(self, session: str) -> None:
        with self._lock:
            self._events[session] = threading.Event()

    def current(self, session: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault(session, threading.Event())

    def cancel(self, session: str) -> None:
        with self._lock:
            event = self._events.get(session)
        if event is not None:
            event.set()

    def forget(self, session: str) -> None:
        with self._lock:
            self._events.pop(session, None)


def user_message(exc: LcmEdgeError) -> str:
    """An error as the UI shows it: the field's label, the problem and the fix."""
    if isinstance(exc, InvalidArgumentError):
        return f"{FIELD_LABELS.get(exc.argument, exc.argument)}: {exc.problem}. Fix: {exc.fix}"
    return str(exc)


def _as_int(value):
    # Gradio's Number with precision=0 gives an int, an empty field None; a float is left for
    # check_inputs to name.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _parse_seed(text):
    # An integer typed as text; anything else goes on as typed, for check_inputs to name.
    if isinstance(text, str) and re.fullmatch(r"\s*\d+\s*", text):
        return int(text)
    return _as_int(text)


class ServeApp:
    """The UI's logic, independent of Gradio's widgets (so it reads and tests as plain Python)."""

    def __init__(self, bundles: list[Path] | None = None, allow_any_folder: bool = True,
                 output_dir: Path | None = None, precision: str = "f32", low_memory: bool = False):
        self.default_bundle = default_bundle_path()
        # Choice label -> folder: the default model, plus any folders given on the command line.
        self.bundle_choices = {DEFAULT_BUNDLE_CHOICE: self.default_bundle}
        for folder in bundles or []:
            self.bundle_choices[str(folder)] = Path(folder).resolve()
        self.allow_any_folder = allow_any_folder
        self.devices = available_devices()
        self.pipelines = WarmPipelines(precision, low_memory)
        self.cancels = CancelEvents()
        # Clips are kept for the server's life (the page links them); a folder made here is removed on close.
        self._owns_output_dir = output_dir is None
        self.output_dir = Path(tempfile.mkdtemp(prefix="lcm-edge-serve-")) if output_dir is None else Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def resolve_bundle(self, choice: str) -> Path:
        if choice in self.bundle_choices:
            return self.bundle_choices[choice]
        if not self.allow_any_folder:
            raise InvalidArgumentError("bundle", f"'{choice}' is not one of this server's bundles",
                                       f"pick one of {list(self.bundle_choices)}")
        folder = Path(str(choice).strip()).expanduser()
        if not folder.is_dir():
            raise InvalidArgumentError("bundle", f"folder '{folder}' does not exist on the server",
                                       "give the path of a bundle folder written by `lcm-edge export`")
        return folder.resolve()

    def generate(self, session: str, prompt: str, negative_prompt: str, frames, height, width, steps,
                 guidance, seed, random_seed: bool, backend: str, device: str, bundle_choice: str,
                 preview: bool = False, decoder: str = "full",
                 on_event: Callable[[str, object], None] = lambda kind, payload: None) -> dict:
        """Run one generation; returns what the UI shows (a dict, never raises an LcmEdgeError).

        on_event("loading", description) before the pipeline is fetched or compiled, then on_event("step",
        StepInfo) after every UNet step; with preview=True its `preview` holds the step's prediction through the
        bundle's tiny decoder (a bundle without one is an error naming the field)."""
        cancel_event = self.cancels.current(session)
        steps_done = []
        try:
            if backend not in self.devices or device not in self.devices[backend]:
                raise BackendError(f"backend/device: {backend} {device} is not available on this server. "
                                   f"Fix: pick one of {self.devices}")
            folder = self.resolve_bundle(bundle_choice)
            bundle = self.pipelines.bundle(folder)
            guidance = float(guidance) if isinstance(guidance, (int, float)) else guidance
            arguments = dict(
                num_frames=_as_int(frames), height=_as_int(height), width=_as_int(width),
                num_inference_steps=_as_int(steps), guidance_scale=guidance,
                # The field is disabled without guidance; what it still holds is not sent.
                negative_prompt=(negative_prompt or None) if isinstance(guidance, float) and guidance > 1 else None,
                seed=None if random_seed else _parse_seed(seed))
            arguments.update(preview=preview, decoder=decoder)
            check_inputs(bundle, prompt, **arguments, callback=on_event)  # before compiling anything
            on_event("loading", f"loading {bundle_choice} on {backend} {device}")
            warm = self.pipelines.get(folder, backend, device)

            def on_step(info: StepInfo) -> None:
                steps_done.append(info)
                on_event("step", info)

            with warm.lock:
                result = warm.pipeline(prompt, **arguments, callback=on_step, cancel_event=cancel_event)
            self._prune_old_clips()
            name = f"clip-{result.seed}-{uuid.uuid4().hex[:8]}"
            gif = result.save(self.output_dir / f"{name}.gif")
            mp4 = result.save(self.output_dir / f"{name}.mp4")
            n, h, w, _ = result.frames.shape
            # The library warns (PromptTruncatedWarning); the page says it from the result, per request.
            dropped = f" The prompt was too long; the text encoder did not see: '{result.truncated_text}'." \
                if result.truncated_text else ""
            return {"clip": str(gif), "files": [str(mp4), str(gif)], "seed": result.seed,
                    "timings": result.timings.summary(),
                    "status": f"Done: {n} frames at {w}x{h}, seed {result.seed}, "
                              f"{warm.pipeline.backend.describe()}.{dropped}"}
        except GenerationCancelled as exc:
            # The stage alone can mislead (a preview's decode reads "VAE decode"): say how far sampling got.
            done = f", after UNet step {len(steps_done)}/{steps_done[-1].num_steps}" if steps_done else ""
            return {"clip": None, "files": None, "seed": None, "timings": "",
                    "status": f"Cancelled during {exc.stage}{done}."}
        except LcmEdgeError as exc:
            return {"clip": None, "files": None, "seed": None, "timings": "", "status": f"Error: {user_message(exc)}"}

    def _prune_old_clips(self) -> None:
        cutoff = time.time() - CLIP_RETENTION_S
        for clip in self.output_dir.glob("clip-*"):
            try:
                if clip.stat().st_mtime < cutoff:
                    clip.unlink()
            except FileNotFoundError:
                continue  # a concurrent request pruned it between the listing and here

    def close(self) -> None:
        if self._owns_output_dir:
            shutil.rmtree(self.output_dir)


def build_ui(app: ServeApp, concurrency: int = DEFAULT_CONCURRENCY):
    """The Gradio Blocks for `app` (queue configured; launch it with `launch`)."""
    try:
        import gradio as gr
    except ImportError as exc:
        raise MissingExtraError("lcm-edge serve", "app", "gradio") from exc

    model = app.pipelines.bundle(app.default_bundle).model
    backends = [name for name in BACKENDS if app.devices.get(name)]
    with gr.Blocks(title="lcm-edge", analytics_enabled=False, delete_cache=(3600, CLIP_RETENTION_S)) as demo:
        gr.Markdown("## lcm-edge: AnimateLCM text-to-video\nThe default model knows coloured shapes moving "
                    "left/right/up/down, e.g. *a red circle moving right*.")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", value=DEFAULT_PROMPT, elem_id="prompt")
                guidance = gr.Slider(1.0, 10.0, value=1.0, step=0.1, label="Guidance",
                                     info="1 = AnimateLCM's CFG-free sampling; above 1 enables the negative prompt",
                                     elem_id="guidance")
                negative = gr.Textbox(label="Negative prompt", interactive=False, elem_id="negative")
                with gr.Row():
                    frames = gr.Number(value=model.default_frames, precision=0, label="Frames", elem_id="frames")
                    height = gr.Number(value=model.default_height, precision=0, label="Height", elem_id="height")
                    width = gr.Number(value=model.default_width, precision=0, label="Width", elem_id="width")
                    steps = gr.Number(value=4, precision=0, label="Steps", elem_id="steps")
                with gr.Row():
                    # Text, not a number field: seeds reach 2**63, beyond a browser's exact integers (2**53).
                    seed = gr.Textbox(value="0", label="Seed", elem_id="seed")
                    random_seed = gr.Checkbox(value=True, label="Random seed", elem_id="random_seed")
                with gr.Row():
                    backend = gr.Dropdown(backends, value=backends[0], label="Backend", elem_id="backend")
                    device = gr.Dropdown(app.devices[backends[0]], value=app.devices[backends[0]][0],
                                         label="Device", elem_id="device")
                bundle = gr.Dropdown(list(app.bundle_choices), value=DEFAULT_BUNDLE_CHOICE,
                                     allow_custom_value=app.allow_any_folder, elem_id="bundle",
                                     label="Bundle" + (" (or type a bundle folder on the server)"
                                                       if app.allow_any_folder else ""))
                with gr.Row():
                    has_tiny = DECODERS["tiny"] in app.pipelines.bundle(app.default_bundle).components
                    live = gr.Checkbox(value=has_tiny, label="Live preview", elem_id="live_preview",
                                       info="each step through the bundle's tiny decoder (a little slower)")
                    decoder = gr.Dropdown(list(DECODERS), value="full", label="Decoder", elem_id="decoder",
                                          info="for the final frames: full VAE, or the tiny one (faster)")
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
            with gr.Column():
                preview = gr.Image(label="Live preview", type="numpy", interactive=False, height=160, visible=False,
                                   elem_id="preview")
                clip = gr.Image(label="Clip", type="filepath", interactive=False, height=320, elem_id="clip")
                status = gr.Markdown(elem_id="status")
                seed_used = gr.Textbox(label="Seed used", interactive=False, elem_id="seed_used")
                timings = gr.Textbox(label="Timings", interactive=False, elem_id="timings")
                files = gr.File(label="Download", file_count="multiple", interactive=False, elem_id="files")

        guidance.change(lambda g: gr.update(interactive=g > 1.0), guidance, negative, queue=False)
        backend.change(lambda b: gr.update(choices=app.devices[b], value=app.devices[b][0]), backend, device,
                       queue=False)

        def arm(request: gr.Request) -> str:
            app.cancels.arm(request.session_hash)
            return "Working..."

        def generate(prompt_, negative_, frames_, height_, width_, steps_, guidance_, seed_, random_, backend_,
                     device_, bundle_, live_, decoder_, request: gr.Request, progress=gr.Progress()):
            # The generation runs on its own thread and reports through a queue, so this generator can stream
            # progress and previews to the page between UNet steps.
            events = SimpleQueue()
            session = request.session_hash
            arguments = (prompt_, negative_, frames_, height_, width_, steps_, guidance_, seed_, random_, backend_,
                         device_, bundle_, live_, decoder_)
            worker = threading.Thread(target=lambda: events.put(("done", app.generate(
                session, *arguments, on_event=lambda kind, payload: events.put((kind, payload))))), daemon=True)
            worker.start()
            finished = False
            try:
                while True:
                    kind, payload = events.get()
                    if kind == "loading":
                        progress(0, desc=payload)
                    elif kind == "step":
                        desc = f"UNet step {payload.step + 1}/{payload.num_steps}"
                        progress((payload.step + 1, payload.num_steps), desc=desc, unit="steps")
                        preview_update = gr.skip()
                        if payload.preview is not None:  # the middle frame of the clip as it forms
                            preview_update = gr.update(value=payload.preview[len(payload.preview) // 2], visible=True)
                        # Also as the status line: a yield reaches the page at once, the progress bar when polled.
                        yield (gr.skip(), f"Working: {desc}") + (gr.skip(),) * 3 + (preview_update,)
                    else:
                        finished = True
                        seed_text = "" if payload["seed"] is None else str(payload["seed"])
                        yield (payload["clip"], payload["status"], seed_text, payload["timings"], payload["files"],
                               gr.skip())
                        return
            finally:
                if not finished:  # the page went away (or Gradio stopped the event): stop the run too
                    app.cancels.cancel(session)

        def cancel(request: gr.Request) -> None:
            app.cancels.cancel(request.session_hash)

        # Arm a fresh cancel event outside the queue, so Cancel pressed while waiting in the queue applies to
        # this run, and one pressed earlier does not.
        run.click(arm, None, status, queue=False).then(
            generate, [prompt, negative, frames, height, width, steps, guidance, seed, random_seed, backend, device,
                       bundle, live, decoder], [clip, status, seed_used, timings, files, preview],
            concurrency_limit=concurrency,
            concurrency_id="generate", show_progress_on=[clip])
        stop.click(cancel, None, None, queue=False)
        def forget(request: gr.Request) -> None:
            app.cancels.forget(request.session_hash)

        demo.unload(forget)
    demo.queue(max_size=MAX_QUEUE)
    return demo


def launch(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, bundles: list[Path] | None = None,
           concurrency: int = DEFAULT_CONCURRENCY, precision: str = "f32", low_memory: bool = False) -> None:
    """Serve until interrupted. Typing a bundle folder is allowed only when bound to loopback."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise InvalidArgumentError("concurrency", f"{concurrency!r} is not a positive integer",
                                   "use 1 (one generation at a time uses every core) or more for several devices")
    app = ServeApp(bundles, allow_any_folder=host in ("127.0.0.1", "localhost", "::1"), precision=precision,
                   low_memory=low_memory)
    try:
        demo = build_ui(app, concurrency)  # raises MissingExtraError without the [app] extra
        import gradio as gr

        # System fonts: the default theme would fetch Google fonts, which an offline edge box cannot.
        theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])
        print(f"lcm-edge serve: http://{host}:{port} (Ctrl-C to stop)", flush=True)
        demo.launch(server_name=host, server_port=port, allowed_paths=[str(app.output_dir)], ssr_mode=False,
                    theme=theme, css=CSS, quiet=True, footer_links=[])
    finally:
        app.close()

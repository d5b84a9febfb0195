"""`lcm-edge batch`: many clips from a JSON-lines file, locally or on a Ray cluster.

Each line of PROMPTS.jsonl is an object with "prompt" and optionally "seed", "frames", "height",
"width", "steps", "guidance" and "negative_prompt". Every line is read and checked against the
bundle (`check_inputs`) before the first clip is made, so a bad line 900 is reported at once, with
its line number, instead of after hours of work.

Each clip's file name comes from its line number and content, so a rerun skips the clips already
written (resume) and redoes a line whose content changed. Workers (local processes or Ray actors)
hold one warm pipeline each and send frames back; only this process writes into the output folder:
clips through `save_video` (a temporary name, renamed when complete) and one JSON line per clip
appended to results.jsonl, so nothing half-written is ever there under a final name.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import socket
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from contextlib import closing as _closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .bundle import Bundle, load_bundle
from .errors import InvalidArgumentError, LcmEdgeError, MissingExtraError
from .pipeline import check_inputs
from .video import VIDEO_EXTENSIONS, save_video

RESULTS_FILE = "results.jsonl"
# Line key -> the pipeline's argument.
LINE_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "seed": "seed", "frames": "num_frames",
             "height": "height", "width": "width", "steps": "num_inference_steps", "guidance": "guidance_scale"}
ON_ERROR = ("skip", "stop")


class BatchLineError(LcmEdgeError):
    """A line of the prompts file cannot be used; `line` is its 1-based number."""

    def __init__(self, path: Path, line: int, problem: str):
        self.path = path
        self.line = line
        self.problem = problem
        super().__init__(f"{path}:{line}: {problem}")


@dataclass(frozen=True)
class Job:
    line: int
    arguments: dict  # the pipeline's keyword arguments, prompt included
    file: str  # the clip's name inside the output folder


def _job_file(line: int, arguments: dict, extension: str) -> str:
    digest = hashlib.sha256(json.dumps(arguments, sort_keys=True).encode()).hexdigest()[:12]
    return f"{line:05d}-{digest}{extension}"


def read_jobs(path: Path, bundle: Bundle, extension: str = ".mp4") -> tuple[list[Job], list[BatchLineError]]:
    """Every usable line as a Job, and a BatchLineError for each line that is not (never raised here)."""
    jobs, errors = [], []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidArgumentError("prompts", f"cannot read '{path}' ({exc.strerror})",
                                   "pass a JSON-lines file, one {\"prompt\": ...} object per line") from exc
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError as exc:
            errors.append(BatchLineError(path, number, f"not JSON ({exc.msg} at column {exc.colno}). Fix: write "
                                                       "one object per line, e.g. {\"prompt\": \"a red circle\"}"))
            continue
        if not isinstance(entry, dict) or "prompt" not in entry:
            errors.append(BatchLineError(path, number, "expected an object with a \"prompt\". Fix: e.g. "
                                                       "{\"prompt\": \"a red circle moving right\", \"seed\": 1}"))
            continue
        unknown = sorted(set(entry) - set(LINE_KEYS))
        if unknown:
            errors.append(BatchLineError(path, number, f"unknown keys {unknown}. Fix: use only {list(LINE_KEYS)}"))
            continue
        arguments = {LINE_KEYS[key]: value for key, value in entry.items()}
        try:
            check_inputs(bundle, **arguments)
        except InvalidArgumentError as exc:
            key = next((k for k, v in LINE_KEYS.items() if v == exc.argument), exc.argument)
            errors.append(BatchLineError(path, number, f"{key}: {exc.problem}. Fix: {exc.fix}"))
            continue
        jobs.append(Job(number, arguments, _job_file(number, arguments, extension)))
    return jobs, errors


# ------------------------------------------------------------------ workers
_worker_pipeline = None  # one warm pipeline per worker process


def _init_worker(bundle: str, backend: str, device: str | None, options: dict) -> None:
    global _worker_pipeline
    from .pipeline import AnimateLCMPipeline

    _worker_pipeline = AnimateLCMPipeline.from_bundle(bundle, backend=backend, device=device, **options)


def _generate(pipeline, job: Job) -> dict:
    """One clip's frames and facts, or its error; a generation error is the line's, not the batch's."""
    try:
        result = pipeline(**job.arguments)
    except LcmEdgeError as exc:
        return {"job": job, "error": str(exc)}
    return {"job": job, "frames": result.frames, "fps": result.fps, "seed": result.seed,
            "timesteps": list(result.timesteps), "truncated_text": result.truncated_text,
            "timings": {"text_encoder_s": result.timings.text_encoder_s, "unet_steps_s": result.timings.unet_steps_s,
                        "vae_decode_s": result.timings.vae_decode_s, "total_s": result.timings.total_s},
            "backend": pipeline.backend.describe(), "worker": f"{socket.gethostname()}:{os.getpid()}"}


def _generate_in_worker(job: Job) -> dict:
    return _generate(_worker_pipeline, job)


class _RayClipWorker:
    """A Ray actor's body: one warm pipeline, one clip per call."""

    def __init__(self, bundle: str, backend: str, device: str | None, options: dict):
        _init_worker(bundle, backend, device, options)

    def generate(self, job: Job) -> dict:
        return _generate_in_worker(job)


def _local_results(jobs: list[Job], bundle: Path, backend: str, device: str | None, options: dict,
                   workers: int) -> Iterator[dict]:
    if workers == 1:  # the pipeline lives in this process
        _init_worker(str(bundle), backend, device, options)
        for job in jobs:
            yield _generate_in_worker(job)
        return
    # spawn: a fresh interpreter per worker, never a fork of a process with runtime threads
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(str(bundle), backend, device, options)) as pool:
        yield from pool.map(_generate_in_worker, jobs)


def _ray_results(jobs: list[Job], bundle: Path, backend: str, device: str | None, options: dict, workers: int,
                 address: str) -> Iterator[dict]:
    try:
        import ray
        from ray.util import ActorPool
    except ImportError as exc:
        raise MissingExtraError("lcm-edge batch on Ray", "ray", "ray") from exc
    connected_here = not ray.is_initialized()  # a caller (or a test) may have connected already
    if connected_here:
        ray.init(address=address)
    try:
        if backend == "onnxruntime":
            options.setdefault("threads", 1)
        # Ray reserves as many of a node's cores as the actor's runtime uses.
        cpus_per_actor = options.get("threads") or 1
        cluster_cpus = ray.cluster_resources().get("CPU", 0)
        if workers * cpus_per_actor > cluster_cpus:
            # Actors beyond the cluster's CPUs would wait for ones that only exit at the end: the batch would hang.
            raise InvalidArgumentError("workers", f"{workers} actors x {cpus_per_actor} CPUs is more than the Ray "
                                       f"cluster's {cluster_cpus:g} CPUs", "use fewer workers or threads, or add nodes")
        actor = ray.remote(num_cpus=cpus_per_actor)(_RayClipWorker)
        # The bundle folder must be readable at the same path on every node (the default model ships inside
        # the package, so it always is).
        pool = ActorPool([actor.remote(str(bundle), backend, device, options) for _ in range(workers)])
        yield from pool.map_unordered(lambda a, job: a.generate.remote(job), jobs)
    finally:
        if connected_here:
            ray.shutdown()


@dataclass
class BatchSummary:
    written: int = 0
    skipped_existing: int = 0
    bad_lines: int = 0
    failed: int = 0


def run_batch(prompts: Path, out: Path, *, bundle: Path, backend: str = "onnxruntime", device: str | None = None,
              options: dict | None = None, workers: int = 1, ray_address: str | None = None,
              on_error: str = "skip", extension: str = ".mp4",
              report: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> BatchSummary:
    """Make every clip of `prompts` not yet in `out`; returns the counts. Lines that cannot be used are
    reported (with their line number) and skipped, or, with on_error="stop", stop the batch before any clip."""
    if on_error not in ON_ERROR:
        raise InvalidArgumentError("on_error", f"unknown {on_error!r}", f"use one of {list(ON_ERROR)}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InvalidArgumentError("workers", f"{workers!r} is not a positive integer", "use e.g. 1 or 2")
    if extension not in VIDEO_EXTENSIONS:
        raise InvalidArgumentError("extension", f"unknown {extension!r}", f"use one of {list(VIDEO_EXTENSIONS)}")
    options = dict(options or {})
    if "threads" in options and backend != "onnxruntime":
        raise InvalidArgumentError("options", f"threads is an onnxruntime option, not {backend}'s",
                                   "drop threads, or use backend='onnxruntime'")
    loaded = load_bundle(bundle)
    jobs, errors = read_jobs(prompts, loaded, extension)
    summary = BatchSummary(bad_lines=len(errors))
    for error in errors:
        report(f"line {error.line}: {error.problem}")
    if errors and on_error == "stop":
        raise errors[0]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [job for job in jobs if not (out / job.file).exists()]
    summary.skipped_existing = len(jobs) - len(todo)
    report(f"{len(jobs)} clips: {summary.skipped_existing} already in {out}, {len(todo)} to make"
           + (f", {len(errors)} bad lines skipped" if errors else ""))
    if not todo:
        return summary
    if ray_address is not None:
        results = _ray_results(todo, loaded.root, backend, device, options, workers, ray_address)
    else:
        if "threads" not in options and backend == "onnxruntime":
            options["threads"] = max(1, (os.cpu_count() or 1) // workers)  # workers share the cores
        results = _local_results(todo, loaded.root, backend, device, options, workers)
    with ExitStack() as stack:
        stack.enter_context(_closing(results))
        log = None  # opened at the first outcome: a batch that cannot start leaves no file behind
        for done, outcome in enumerate(results, start=1):
            if log is None:
                log = stack.enter_context(open(out / RESULTS_FILE, "a", encoding="utf-8"))
            job = outcome["job"]
            record = {"line": job.line, "prompt": job.arguments["prompt"]}
            if "error" in outcome:
                summary.failed += 1
                record["error"] = outcome["error"]
                report(f"[{done}/{len(todo)}] line {job.line}: {outcome['error']}")
            else:
                save_video(outcome["frames"], out / job.file, outcome["fps"])
                summary.written += 1
                frames, height, width, _ = outcome["frames"].shape
                record.update(file=job.file, seed=outcome["seed"], frames=frames, height=height, width=width,
                              timesteps=outcome["timesteps"], timings=outcome["timings"], backend=outcome["backend"],
                              worker=outcome["worker"])
                if outcome["truncated_text"]:  # the prompt was longer than the text encoder takes
                    record["truncated_text"] = outcome["truncated_text"]
                report(f"[{done}/{len(todo)}] line {job.line}: {job.file} (seed {outcome['seed']}, "
                       f"{outcome['timings']['total_s']:.2f} s)")
            log.write(json.dumps(record) + "\n")
            log.flush()
            if "error" in outcome and on_error == "stop":
                raise BatchLineError(Path(prompts), job.line, outcome["error"])
    return summary

"""OpenVINO backend: device CPU, GPU, NPU or AUTO, with a compile cache and a performance hint.

Static shapes (the default): each graph is reshaped to a call's input shapes and compiled for
them, and a few compiled shapes are kept per graph (least recently used first out). On the
full-size SD1.5 UNet at 512x512x16 this cut peak RSS from 20.9 to 15.4 GiB and the first pass by
17 s against the dynamic graph, at the same steady-state step; the NPU plugin takes static shapes
only. The graph file is read again for each new shape and the `ov.Model` dropped once compiled, so
its weights (memory-mapped IR, or a heap copy of an ONNX graph) do not sit beside the compiled copy.

Threads: each compiled shape hands out infer requests from a bounded pool (an OpenVINO infer
request runs one inference at a time; a second caller got RuntimeError 'Infer Request is busy').
`max_infer_requests=1` makes callers queue for one request, which is a lock.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from ..bundle import ComponentInfo, TensorSpec
from ..errors import (BackendError, BundleIntegrityError, GraphInputError, InferenceError, InvalidArgumentError,
                      MissingExtraError)
from .base import Backend, Session, check_graph_matches_manifest

DEVICES = ("CPU", "GPU", "NPU", "AUTO")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
INFERENCE_PRECISIONS = ("f32", "f16", "bf16")
# What OpenVINO's OPTIMIZATION_CAPABILITIES lists for a device that computes at that precision.
PRECISION_CAPABILITY = {"f32": "FP32", "f16": "FP16", "bf16": "BF16"}
SHAPE_CACHE_SIZE = 2  # compiled shapes kept per graph: a UNet at full size is 3.4 GB of weights per copy
LOW_MEMORY_SHAPE_CACHE_SIZE = 1
# Requests per compiled shape that threads may run at once. 1 (callers queue: a lock) took 64.7 s against 78.2 s
# for a pool of 4, at 4 threads x 3 calls on the default bundle on 2 cores (benchmarks/soak.py --compare-requests):
# with LATENCY one inference already uses every core, and each request holds its own activations.
MAX_INFER_REQUESTS = 1
_MADV_DONTNEED = 4  # Linux <sys/mman.h>
# While a graph compiles, its weights' file pages are dropped this often: the compiler reads the file once while
# it builds its own copy, so without it the whole file is resident beside that copy at the end of the compile.
RELEASE_INTERVAL_S = 0.25
_log = logging.getLogger(__name__)


def release_mapped_weights(folder: Path) -> int:
    """Drop this process's resident pages of read-only memory-mapped files in `folder`; returns the bytes asked.

    OpenVINO memory-maps the IR weights, and the compiled model keeps the mapping for the constants it uses as
    they are, while it repacks most weights into its own memory: after a compile every page of the file stays
    resident beside the repacked copy (full-size UNet, f32, 512x512x16: 4.95 GiB of file pages next to 5.08 GiB
    of OpenVINO's own, benchmarks/research/openvino_unet_memory.py). The pages are clean copies of the file, so
    dropping them loses nothing: the few the graph still reads fault back in from the page cache. Linux only
    (madvise over /proc/self/maps); elsewhere it does nothing and returns 0.
    """
    maps = Path("/proc/self/maps")
    if not sys.platform.startswith("linux") or not maps.is_file():
        return 0
    folder = str(Path(folder).resolve())
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    released = 0
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        # Writable mappings are skipped: MADV_DONTNEED would discard a private mapping's written pages.
        if len(fields) < 6 or "w" in fields[1] or not fields[5].startswith(folder + "/"):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if libc.madvise(start, end - start, _MADV_DONTNEED) != 0:
            errno = ctypes.get_errno()
            _log.warning("madvise(MADV_DONTNEED) failed for %s (errno %d): its pages stay resident", fields[5], errno)
            continue
        released += end - start
    return released


@contextmanager
def releasing_mapped_weights(folder: Path, interval_s: float = RELEASE_INTERVAL_S) -> Iterator[None]:
    """Run the body (a compile) while a thread calls `release_mapped_weights(folder)` every `interval_s`, and
    once more after it: the compile's peak is then its own copy of the weights, not that plus the whole file.
    OpenVINO's compile_model releases the GIL, so the thread runs during it."""
    done = threading.Event()

    def release_until_done() -> None:
        while not done.wait(interval_s):
            release_mapped_weights(folder)

    thread = threading.Thread(target=release_until_done, name="release-mapped-weights", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        release_mapped_weights(folder)


def _import_openvino():
    try:
        import openvino as ov
    except ImportError as exc:
        raise MissingExtraError("the OpenVINO backend", "openvino", "openvino") from exc
    return ov


def _tensor_spec(port, wanted: set[str]) -> TensorSpec:
    # A port can carry several tensor names (an input fused into its first op keeps both);
    # take the one the exporter named, so feeds and results use the bundle's names.
    names = port.get_names()
    chosen = sorted(names & wanted) or sorted(names)
    shape = tuple(d.get_length() if d.is_static else "?" for d in port.get_partial_shape())
    return TensorSpec(chosen[0], str(np.dtype(port.get_element_type().to_dtype())), shape)


def device_capabilities(core, device: str) -> frozenset[str]:
    """OpenVINO's own word on what `device` computes in (e.g. {'FP32', 'BF16', 'INT8'} on an AVX512_BF16 CPU)."""
    return frozenset(str(c) for c in core.get_property(device, "OPTIMIZATION_CAPABILITIES"))


class CompiledShape:
    """One compiled model (at one input shape, or dynamic) and a bounded pool of its infer requests."""

    def __init__(self, compiled, max_requests: int):
        self.compiled = compiled
        self._idle: list = []
        self._slots = threading.BoundedSemaphore(max_requests)
        self._lock = threading.Lock()

    @contextmanager
    def request(self) -> Iterator:
        with self._slots:
            with self._lock:
                request = self._idle.pop() if self._idle else None
            if request is None:
                request = self.compiled.create_infer_request()
            try:
                yield request
            finally:
                with self._lock:
                    self._idle.append(request)


class OpenVinoSession(Session):
    def __init__(self, backend: "OpenVinoBackend", component: ComponentInfo, path: Path):
        self._backend = backend
        self._wanted = {t.name for t in component.inputs + component.outputs}
        model = backend.read_model(path)
        super().__init__(component.name, path, tuple(_tensor_spec(p, self._wanted) for p in model.inputs),
                         tuple(_tensor_spec(p, self._wanted) for p in model.outputs))
        # Shape key -> CompiledShape, least recently used first. Dynamic mode keeps one entry under None.
        self._compiled: OrderedDict[tuple | None, CompiledShape] = OrderedDict()
        self._compile_lock = threading.Lock()
        if not backend.static_shapes:
            self._compiled[None] = self._compile(model, None)
        del model  # the compiled model holds what it needs; the read graph's weights go now

    def _compile(self, model, shapes: tuple[tuple[int, ...], ...] | None) -> CompiledShape:
        ov = _import_openvino()
        if shapes is not None:
            try:
                model.reshape({port: ov.PartialShape(list(shape)) for port, shape in zip(model.inputs, shapes)})
            except RuntimeError as exc:
                raise GraphInputError(f"{self.name}: the graph cannot be reshaped to static input shapes "
                                      f"{list(shapes)} ({exc}). Fix: use a size the bundle was exported for, or "
                                      "static_shapes=False") from exc
        release = releasing_mapped_weights(self.path.parent) if self._backend.mmap_weights else nullcontext()
        try:
            with release:
                compiled = self._backend.core.compile_model(model, self._backend.device, self._backend.config)
        except RuntimeError as exc:
            raise InferenceError(self.name, f"OpenVINO could not compile it for {self._backend.device} at input "
                                 f"shapes {shapes or 'dynamic'} ({exc})",
                                 "check the device's driver, or use device='CPU'") from exc
        return CompiledShape(compiled, self._backend.max_infer_requests)

    def _entry(self, shapes: tuple[tuple[int, ...], ...]) -> CompiledShape:
        key = None if not self._backend.static_shapes else shapes
        with self._compile_lock:  # one compile per shape, even when threads ask for it at once
            entry = self._compiled.get(key)
            if entry is None:
                # Evicted before the compile, not after: a compiled graph holds about twice the IR's weights, and
                # evicting after held one more than shape_cache_size at the peak (2 full-size UNets at size 1).
                # Evicted shapes go as soon as no running call holds them (a call keeps its entry alive).
                while len(self._compiled) >= self._backend.shape_cache_size:
                    self._compiled.popitem(last=False)
                entry = self._compile(self._backend.read_model(self.path), key)
                self._compiled[key] = entry
            self._compiled.move_to_end(key)
            return entry

    def compiled_shapes(self) -> list[tuple | None]:
        """The input shapes compiled and kept now, least recently used first (None: the dynamic graph)."""
        with self._compile_lock:
            return list(self._compiled)

    def prepare(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self._entry(tuple(tuple(int(d) for d in shapes[spec.name]) for spec in self.inputs))

    def close(self) -> None:
        with self._compile_lock:
            self._compiled.clear()

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        ordered = [feeds[spec.name] for spec in self.inputs]
        entry = self._entry(tuple(a.shape for a in ordered))
        with entry.request() as request:
            try:
                # share_inputs=False: OpenVINO otherwise aliases caller arrays, and a later request at
                # another shape was seen overwriting them (the text embeddings are reused every step).
                results = request.infer(ordered, share_inputs=False, share_outputs=False)
            except RuntimeError as exc:
                raise InferenceError(self.name, f"OpenVINO inference failed on {self._backend.device} ({exc})",
                                     "check free memory and the device; rerun with device='CPU' to compare") from exc
            return {spec.name: np.array(results[i]) for i, spec in enumerate(self.outputs)}


class OpenVinoBackend(Backend):
    """Uses the bundle's OpenVINO IR when it has one, else reads the ONNX graph (`Session.path` says which).

    inference_precision: "f32" (default, matches PyTorch), or "bf16"/"f16" where the device computes
    in it (OpenVINO's OPTIMIZATION_CAPABILITIES: BF16 on CPUs with AVX512_BF16 or AMX, FP16 on GPUs);
    asking for one the device lacks is an InvalidArgumentError before any graph compiles. Check a
    setting with `lcm_edge.precision.check_precision` before shipping it.
    static_shapes: compile per call shape (default; the NPU needs it) or once for dynamic shapes.
    shape_cache_size: compiled shapes kept per graph (1 with low_memory).
    max_infer_requests: how many threads may run one compiled graph at once (1: they queue).
    mmap_weights: OpenVINO's ENABLE_MMAP for reading IR weights.
    """

    name = "openvino"

    def __init__(self, device: str = "CPU", *, cache_dir: str | Path | None = None,
                 performance_hint: str = "LATENCY", inference_precision: str = "f32",
                 config: Mapping[str, str] | None = None, static_shapes: bool = True,
                 shape_cache_size: int | None = None, max_infer_requests: int = MAX_INFER_REQUESTS,
                 mmap_weights: bool = True, low_memory: bool = False):
        ov = _import_openvino()
        self.core = ov.Core()
        device_upper = device.upper()
        family = device_upper.split(".")[0].split(":")[0]
        if family not in DEVICES:
            raise BackendError(f"device: unknown OpenVINO device '{device}'. Fix: use one of {list(DEVICES)}")
        if not isinstance(static_shapes, bool):
            raise InvalidArgumentError("static_shapes", f"{static_shapes!r} is not a bool", "pass True or False")
        if not static_shapes and family == "NPU":
            raise InvalidArgumentError("static_shapes", "False, but OpenVINO's NPU plugin compiles static shapes "
                                       "only", "drop static_shapes=False (static is the default)")
        available = self.core.available_devices
        if family != "AUTO" and not any(d.split(".")[0] == family for d in available):
            raise BackendError(f"device: OpenVINO device {device_upper} is not available on this machine; "
                               f"available: {available}. Fix: pick one of those or AUTO")
        if performance_hint.upper() not in PERFORMANCE_HINTS:
            raise BackendError(f"performance_hint: unknown '{performance_hint}'. Fix: use one of "
                               f"{list(PERFORMANCE_HINTS)}")
        if inference_precision not in INFERENCE_PRECISIONS:
            raise BackendError(f"inference_precision: unknown '{inference_precision}'. Fix: use one of "
                               f"{list(INFERENCE_PRECISIONS)}")
        for argument, value in (("shape_cache_size", shape_cache_size), ("max_infer_requests", max_infer_requests)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidArgumentError(argument, f"{value!r} is not a positive int", "pass e.g. 1 or 2")
        self.device = device_upper
        self.performance_hint = performance_hint.upper()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if inference_precision != "f32":
            self._check_precision(inference_precision, family)
        # f32 unless asked: OpenVINO's CPU plugin silently picks bf16 where the CPU has it
        # (1e-2 relative error on CLIP here) and GPU plugins pick f16.
        self.inference_precision = self.precision = inference_precision
        self.static_shapes = static_shapes
        self.low_memory = low_memory
        self.shape_cache_size = shape_cache_size or (LOW_MEMORY_SHAPE_CACHE_SIZE if low_memory else SHAPE_CACHE_SIZE)
        self.max_infer_requests = max_infer_requests
        self.mmap_weights = mmap_weights
        self.core.set_property({"ENABLE_MMAP": mmap_weights})
        self.config = {"PERFORMANCE_HINT": self.performance_hint, "INFERENCE_PRECISION_HINT": inference_precision,
                       **dict(config or {})}
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self.config["CACHE_DIR"] = str(self.cache_dir)
        self._version = ov.__version__.split("-")[0]

    def _check_precision(self, precision: str, family: str) -> None:
        if family == "AUTO":
            raise InvalidArgumentError("inference_precision", f"{precision} with device AUTO, which may pick a "
                                       "device without it", "name the device (CPU, GPU or NPU), or use 'f32'")
        capabilities = device_capabilities(self.core, self.device)
        if PRECISION_CAPABILITY[precision] not in capabilities:
            raise InvalidArgumentError(
                "inference_precision", f"{self.device} does not compute in {precision} (OpenVINO lists "
                f"{sorted(capabilities)}; bf16 needs a CPU with AVX512_BF16 or AMX, f16 a GPU)",
                "use 'f32', or precision='auto', which picks the fastest precision this machine has and has passed "
                "the fidelity gate")

    def supported_precisions(self) -> tuple[str, ...]:
        if self.device.split(".")[0] == "AUTO":
            return ("f32",)
        capabilities = device_capabilities(self.core, self.device)
        return tuple(p for p in ("f32", "f16", "bf16") if PRECISION_CAPABILITY[p] in capabilities)

    def read_model(self, path: Path):
        try:
            return self.core.read_model(str(path))
        except RuntimeError as exc:
            raise BundleIntegrityError(path, f"OpenVINO cannot read the graph ({exc})",
                                       "re-export the bundle") from exc

    def open(self, bundle_root: Path, component: ComponentInfo) -> Session:
        return check_graph_matches_manifest(
            component, OpenVinoSession(self, component, bundle_root / (component.openvino or component.onnx)))

    def describe(self) -> str:
        shapes = "static shapes" if self.static_shapes else "dynamic shapes"
        note = f" ({self.precision_note})" if self.precision_note else ""
        return (f"openvino {self._version} {self.device} {self.performance_hint} {self.inference_precision}{note} "
                f"{shapes}{' low-memory' if self.low_memory else ''}")

"""INT8 bundles for onnxruntime and OpenVINO, calibrated on the runtime's own sampling loop and gated on quality.

Recipe (`quantize_bundle`): 1. check every argument, the bundle, the output folder and the memory need before
any heavy work; 2. record UNet inputs from the fp32 bundle's own 4-step sampling (calibration.py), and held-out
inputs at other seeds; 3. per backend, quantize the UNet with the recipe, the text encoder (and for OpenVINO the
VAE decoder) weight-only; 4. gate every graph against the fp32 graph on the same runtime (named tolerances below);
5. write the bundle to a temporary folder, gate end to end (frame PSNR with the same latents and noise) and, on the
shipped default model, on prompt adherence read by the detector; 6. record every figure in bundle.json, read the
bundle back and rename it into place. A failed gate raises `QuantizationGateError` and nothing is written.

Recipes (`RECIPES`):
- onnxruntime hybrid: static QDQ INT8 per channel on convolutions (activations uint8, weights int8) + 8-bit
  weight-only MatMul (com.microsoft MatMulNBits, bits=8) on the linear layers; full: static QDQ on convolutions
  and linear layers (MatMul/Gemm with weights).
- OpenVINO hybrid: `nncf.compress_weights` INT8 weight-only on MatMul/Gather (Convolution ignored) +
  `nncf.quantize(model_type=TRANSFORMER)` W8A8 on convolutions, weighted MatMuls ignored, SmoothQuant off;
  full: `nncf.quantize(model_type=TRANSFORMER)` W8A8 on convolutions and linear layers.
Both keep `SENSITIVE_LAYERS` (conv_in, conv_out, the time embedding MLP, shortcut convs) in float. Attention's
activation x activation MatMuls stay float in every recipe.
On CPUs without VNNI, int8 x int8 products saturate (VPMADDUBSW): onnxruntime gets `reduce_range` (7-bit
weights) and NNCF the overflow fix; chosen from the CPU flags (`int8_traits`), recorded in the provenance.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.util
import json
import logging
import os
import platform
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

import lcm_edge
from lcm_edge.atomic_output import Partial
from lcm_edge.backends import create_backend
from lcm_edge.backends.openvino_backend import releasing_mapped_weights
from lcm_edge.bench.child import peak_rss_gib
from lcm_edge.bundle import Bundle, ComponentInfo, load_bundle, load_unpublished_bundle, read_json, write_manifest
from lcm_edge.cpu import cpu_flags
from lcm_edge.errors import InvalidArgumentError, MissingExtraError, ParityError
from lcm_edge.fidelity import psnr_db

from .bundle_writer import _prepare_destination
from .calibration import (CALIBRATION_SEED_BASE, DEFAULT_PROMPTS_FILE, HELD_OUT_SEED_BASE, CalibrationPlan,
                          UNetCalibrationSet, plan_calibration, read_prompts, record_unet_inputs,
                          text_encoder_inputs)
from .onnx_io import EXTERNAL_DATA_NAME
from .openvino_ir import convert_to_openvino

BACKEND_CHOICES = ("onnxruntime", "openvino", "both")
RECIPES = {"onnxruntime": ("hybrid", "full"), "openvino": ("hybrid", "full")}
# Layers kept in float in every recipe (ONNX node / OpenVINO op names contain these): the first and last
# convolutions, the timestep MLP and the residual shortcut convolutions, where INT8 error is not averaged away.
SENSITIVE_LAYERS = ("conv_in", "conv_out", "time_embedding", "conv_shortcut")
# Any of these flags means the CPU has int8 dot products without the u8 x s8 saturation of AVX2/AVX-512F.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# Adherence of the default model is read on these seeds (the evaluation's second range, never used for tuning).
ADHERENCE_SEED_BASE = 30_000
# End-to-end PSNR clips are sampled at these seeds (neither calibration nor held-out inputs).
E2E_SEED_BASE = 90_000
PSNR_CAP_DB = 100.0  # identical frames


@dataclass(frozen=True)
class StepGate:
    """INT8 vs fp32 output of one graph on the same input: cosine similarity and relative L2 error."""

    name: str
    min_cosine: float
    max_rel_error: float  # ||int8 - fp32|| / ||fp32||


# Per UNet step (each timestep of the schedule separately), held-out inputs recorded from the loop.
UNET_INT8_GATE = StepGate("unet-int8-vs-fp32-per-step", min_cosine=0.99, max_rel_error=0.15)
# Weight-only text encoder: its hidden states feed every UNet step, so it gets the tighter gate.
TEXT_ENCODER_INT8_GATE = StepGate("text-encoder-int8-vs-fp32", min_cosine=0.999, max_rel_error=0.05)
# Weight-only VAE decoder (OpenVINO): frames decoded from the same fp32 latents.
VAE_DECODER_INT8_MIN_PSNR_DB = 35.0
# End to end: uint8 frames of the INT8 bundle vs the fp32 bundle, same prompt, latents and noise (mean over clips).
FRAMES_INT8_MIN_PSNR_DB = 22.0
# Behavioural (default model only): INT8 adherence may be at most this far below fp32 on the same clips' seeds.
ADHERENCE_INT8_MARGIN = 0.10

# Memory model of a quantization run (see estimate_peak_bytes): copies of the fp32 UNet weights alive at once
# (the graph, the quantizer's working copy, the calibration session or compiled model, the quantized result), per
# backend and recipe, fitted to runs on the full-size UNet (5.25 GB fp32, 16-32 samples at 8x256x256):
# - onnxruntime hybrid: 12.81 GiB with calibration apart from quantize_static (_ort_calibration_ranges; 2.3
#   copies; 17.97 GiB before).
# - onnxruntime full: killed above 21.87 GiB while calibrating (more than 4.15 copies; its augmented graph also
#   reduces every MatMul's tensors): 4.3, a lower bound, keeps a 24 GiB machine from starting a run it cannot finish.
# - OpenVINO full: 15.35 GiB (2.9 copies) with the mapped weight file's pages released during NNCF's work
#   (20.20 GiB before). Hybrid, 17.46 GiB before the release (2.7 GiB under full then), is given full's figure.
WEIGHT_COPIES = {"onnxruntime": {"hybrid": 2.4, "full": 4.3}, "openvino": {"hybrid": 3.0, "full": 3.0}}
# onnxruntime's MinMax calibration turns every intermediate tensor into a graph output, so one pass holds all
# of them; this many feature maps of the first UNet level stand for that sum (OpenVINO keeps a few at a time).
LIVE_FEATURE_MAPS = {"onnxruntime": 60.0, "openvino": 8.0}
BASELINE_BYTES = 512 << 20  # interpreter, onnxruntime/OpenVINO/NNCF libraries


class QuantizationGateError(ParityError):
    """An INT8 graph or bundle failed a quality gate; `failures` lists every failing figure. Nothing was written."""


class InsufficientMemoryError(InvalidArgumentError):
    """The requested calibration shapes need more memory than this machine has free (checked before any work)."""


# ------------------------------------------------------------------------------------------------ CPU traits
@dataclass(frozen=True)
class CpuInt8Traits:
    flags: tuple[str, ...]  # the int8-relevant flags found
    vnni: bool

    @property
    def reduce_range(self) -> bool:
        """onnxruntime: 7-bit weights where u8 x s8 products would saturate 16-bit sums (no VNNI)."""
        return not self.vnni

    @property
    def overflow_fix(self) -> str:
        """NNCF OverflowFix: 'enable' (7-bit weight range) without VNNI, 'disable' with it."""
        return "disable" if self.vnni else "enable"

    def to_dict(self) -> dict:
        return {"flags": list(self.flags), "vnni": self.vnni, "reduce_range": self.reduce_range,
                "overflow_fix": self.overflow_fix}


def read_cpu_flags(path: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (lcm_edge.cpu); empty where /proc/cpuinfo does not exist."""
    return cpu_flags(path)


def int8_traits(flags: Iterable[str]) -> CpuInt8Traits:
    """From CPU flags to the INT8 settings. Unknown flags (not Linux) count as no VNNI: the safe, slower choice."""
    flags = frozenset(flags)
    relevant = tuple(sorted(f for f in flags if f in VNNI_FLAGS + ("avx2", "avx512f", "avx512_bf16", "amx_tile")))
    return CpuInt8Traits(relevant, any(f in flags for f in VNNI_FLAGS))


# ------------------------------------------------------------------------------------------------ memory
def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); elsewhere physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _component_bytes(bundle: Bundle, name: str) -> int:
    c = bundle.components[name]
    return sum(bundle.files[rel].size for rel in (c.onnx, c.onnx_data) if rel is not None)


def estimate_peak_bytes(bundle: Bundle, plan: CalibrationPlan, backend: str, recipe: str = "hybrid") -> int:
    """A conservative estimate of one quantization run's peak RSS, from the shapes alone (nothing is run).

    weights x WEIGHT_COPIES[backend][recipe] + one UNet pass's activations: the largest spatial attention scores (and their
    softmax) plus LIVE_FEATURE_MAPS first-level feature maps, plus the one calibration sample in memory.
    """
    config = read_json(bundle.root / bundle.components["unet"].config)
    heads = config.get("attention_head_dim", 8)
    heads = max(heads) if isinstance(heads, (list, tuple)) else int(heads)
    channels = int(config.get("block_out_channels", [320])[0])
    batch = 2 if plan.guidance_scale else 1
    _, _, frames, h, w = plan.latent_shape(bundle, batch)
    scores = batch * frames * heads * (h * w) ** 2 * 4
    feature_map = batch * frames * channels * h * w * 4
    activations = 2 * scores + LIVE_FEATURE_MAPS[backend] * feature_map
    return int(_weights_bytes(bundle, backend, recipe) + activations + plan.sample_bytes(bundle) + BASELINE_BYTES)


def _weights_bytes(bundle: Bundle, backend: str, recipe: str) -> int:
    return int(WEIGHT_COPIES[backend][recipe] * _component_bytes(bundle, "unet"))


def check_resources(bundle: Bundle, plan: CalibrationPlan, backends: Sequence[str], work_folder: Path,
                    memory_limit_bytes: int | None = None, recipe: str = "hybrid") -> dict:
    """Typed errors, before any work, when memory or disk cannot hold the requested calibration."""
    limit = available_memory_bytes() if memory_limit_bytes is None else int(memory_limit_bytes)
    need = max(estimate_peak_bytes(bundle, plan, b, recipe) for b in backends)
    weights_need = max(_weights_bytes(bundle, b, recipe) for b in backends) + BASELINE_BYTES
    if weights_need > limit:  # no calibration shape helps: the weight copies alone do not fit
        others = [r for r in RECIPES[backends[0]] if r != recipe
                  and max(_weights_bytes(bundle, b, r) for b in backends) + BASELINE_BYTES <= limit]
        raise InsufficientMemoryError(
            "recipe", f"the {recipe} recipe holds about {weights_need / 2**30:.1f} GiB of copies of this UNet's "
            f"weights at once, {limit / 2**30:.1f} GiB is available",
            (f"use recipe='{others[0]}', or " if others else "") + "quantize on a machine with more memory")
    if need > limit:
        raise InsufficientMemoryError(
            "frames", f"calibrating at {plan.frames} frames x {plan.height}x{plan.width} needs about "
            f"{need / 2**30:.1f} GiB, {limit / 2**30:.1f} GiB is available",
            "calibrate at fewer frames or a smaller height/width (the published 4-step recipe uses 8 frames at "
            "256x256; the INT8 graphs still run at any size), or free memory")
    disk_need = (plan.samples + plan.steps * 2) * plan.sample_bytes(bundle) + 2 * _component_bytes(bundle, "unet")
    free = shutil.disk_usage(work_folder).free
    if disk_need > free:
        raise InsufficientMemoryError(
            "samples", f"{plan.samples} calibration samples and the INT8 graphs need {disk_need / 2**30:.1f} GiB of "
            f"disk beside the output, {free / 2**30:.1f} GiB is free", "record fewer samples or free disk space")
    return {"estimated_peak_bytes": need, "available_bytes": limit, "disk_bytes": disk_need}


# ------------------------------------------------------------------------------------------------ figures
def cosine_and_rel_error(expected: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    a = actual.astype(np.float64).ravel()
    b = expected.astype(np.float64).ravel()
    if a.shape != b.shape or not np.isfinite(a).all():
        return -1.0, float("inf")
    nb, na = float(np.linalg.norm(b)), float(np.linalg.norm(a))
    cosine = float(a @ b / (na * nb)) if na > 0 and nb > 0 else float(na == nb)
    rel = float(np.linalg.norm(a - b) / nb) if nb > 0 else float(np.linalg.norm(a))
    return cosine, rel


def frames_psnr(expected: np.ndarray, actual: np.ndarray) -> float:
    """PSNR (dB) of uint8 frames (lcm_edge.fidelity), capped at PSNR_CAP_DB so identical frames stay finite in JSON."""
    return min(PSNR_CAP_DB, psnr_db(expected, actual))


def _gate_figures(gate: StepGate, label: str, pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[dict, list[str]]:
    cosines, rels = [], []
    for expected, actual in pairs:
        c, r = cosine_and_rel_error(expected, actual)
        cosines.append(c)
        rels.append(r)
    figures = {"gate": dataclasses.asdict(gate), "inputs": len(cosines), "min_cosine": min(cosines),
               "max_rel_error": max(rels), "mean_cosine": float(np.mean(cosines))}
    failures = []
    if figures["min_cosine"] < gate.min_cosine or figures["max_rel_error"] > gate.max_rel_error:
        failures.append(f"{label}: cosine {figures['min_cosine']:.5f} (gate {gate.name} >= {gate.min_cosine}), "
                        f"relative error {figures['max_rel_error']:.4f} (<= {gate.max_rel_error})")
    return figures, failures


# ------------------------------------------------------------------------------------------------ graphs
def _onnx_weighted_nodes(model, op_types: Sequence[str]) -> list[str]:
    """Names of nodes of `op_types` whose second input is a weight (an initializer)."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in op_types and len(n.input) > 1 and n.input[1] in inits]


def _is_sensitive(name: str) -> bool:
    """A layer of SENSITIVE_LAYERS, by a path segment of its node name ('/unet/conv_in/Conv')."""
    return any(segment in SENSITIVE_LAYERS for segment in name.split("/"))


class _OrtReader:
    """onnxruntime CalibrationDataReader over the recorded samples, read from disk one at a time; `set_range`
    serves quantize_static's CalibStridedMinMax (statistics merged after every stride, not held for all)."""

    def __init__(self, samples: UNetCalibrationSet):
        self._samples = samples
        self.set_range(0, len(samples))

    def __len__(self) -> int:
        return len(self._samples)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._indices = iter(range(start_index, min(end_index, len(self._samples))))

    def get_next(self):
        index = next(self._indices, None)
        return None if index is None else self._samples[index]

    def rewind(self) -> None:
        self.set_range(0, len(self._samples))


def _save_onnx(model, path: Path, external: bool) -> Path | None:
    import onnx

    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA_NAME, size_threshold=1024, convert_attribute=True)
        return path.parent / EXTERNAL_DATA_NAME
    onnx.save_model(model, str(path))
    return None


def _ort_calibration_ranges(model: Path, op_types: Sequence[str], calibration: UNetCalibrationSet, *,
                            external: bool, work: Path) -> Path:
    """MinMax ranges of the tensors quantize_static calibrates, written to onnxruntime's calibration cache (JSON).

    Apart from quantize_static because it holds its own copy of the graph while its calibrator holds a second one
    and the calibration session a third: the full-size UNet's calibration peaked at 17.97 GiB RSS that way. Here
    only the session is alive while it runs, and it is gone before quantize_static loads the graph to quantize it
    from the cached ranges."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorsData, create_calibrator, save_tensors_data

    ranges = work / "calibration_ranges.json"
    calibrator = create_calibrator(model, list(op_types), augmented_model_path=str(work / "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax, use_external_data_format=external)
    # The calibrator keeps the augmented graph it saved and opened a session on; only the session runs from here
    # (collect/compute_data read the session and the output names kept at init), so the graph's copy goes now.
    calibrator.model = None
    reader = _OrtReader(calibration)
    for index in range(len(reader)):  # merge the statistics after every sample: one pass's in memory at a time
        reader.set_range(index, index + 1)
        calibrator.collect_data(reader)
    data = calibrator.compute_data()
    del calibrator
    if not isinstance(data, TensorsData):
        raise TypeError(f"onnxruntime's MinMax calibrator returned {type(data).__name__}, not TensorsData")
    save_tensors_data(data, ranges)
    for leftover in work.glob("augmented.onnx*"):
        leftover.unlink()
    return ranges


def ort_quantize_unet(src: Path, dst: Path, recipe: str, calibration: UNetCalibrationSet,
                      traits: CpuInt8Traits, *, external: bool, work: Path) -> dict:
    """onnxruntime recipe on the UNet graph at `src`; writes `dst` (+ model.onnx_data when `external`)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    work.mkdir(parents=True, exist_ok=True)
    pre = work / "pre.onnx"
    # Symbolic shape inference fails on the exported UNet ("Incomplete symbolic shape inference"): skip it.
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, save_as_external_data=external,
                      all_tensors_to_one_file=True, external_data_location="pre.onnx_data")
    graph = onnx.load(str(pre), load_external_data=False)
    convs = [n for n in _onnx_weighted_nodes(graph, ("Conv",)) if not _is_sensitive(n)]
    linears = [n for n in _onnx_weighted_nodes(graph, ("MatMul", "Gemm")) if not _is_sensitive(n)]
    del graph
    static_nodes = convs if recipe == "hybrid" else convs + linears
    # Only these op types' tensors are calibrated (every other tensor would be a graph output too).
    op_types = ["Conv"] if recipe == "hybrid" else ["Conv", "MatMul", "Gemm"]
    ranges = _ort_calibration_ranges(pre, op_types, calibration, external=external, work=work)
    static = work / "static.onnx"
    quantize_static(str(pre), str(static), None, quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                    nodes_to_quantize=static_nodes,
                    per_channel=True, reduce_range=traits.reduce_range, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                    use_external_data_format=external, calibration_cache_path=str(ranges))
    model = onnx.load(str(static))
    weight_only: list[str] = []
    if recipe == "hybrid":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        weight_only = [n for n in linears if n in {x.name for x in model.graph.node if x.op_type == "MatMul"}]
        quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=128, is_symmetric=True,
                                         nodes_to_include=weight_only, op_types_to_quantize=("MatMul",))
        quantizer.process()
        model = quantizer.model.model
    data = _save_onnx(model, dst, external)
    del model
    onnx.checker.check_model(str(dst))
    return {"method": f"onnxruntime {_versions()['onnxruntime']} quantize_static QDQ"
                      + (" + MatMulNBits bits=8" if recipe == "hybrid" else ""),
            "w8a8_nodes": len(static_nodes), "weight_only_nodes": len(weight_only),
            "kept_float": list(SENSITIVE_LAYERS) + ["attention activation x activation MatMuls"],
            "reduce_range": traits.reduce_range, "activations": "uint8 asymmetric, MinMax",
            "weights": "int8 symmetric per channel", "pre_process": "quant_pre_process(skip_symbolic_shape=True)",
            "external_data": data is not None}


def ort_weight_only(src: Path, dst: Path, *, external: bool) -> dict:
    """8-bit weight-only MatMul (MatMulNBits bits=8) for the text encoder."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=128, is_symmetric=True, op_types_to_quantize=("MatMul",))
    quantizer.process()
    count = sum(n.op_type == "MatMulNBits" for n in quantizer.model.model.graph.node)
    _save_onnx(quantizer.model.model, dst, external)
    onnx.checker.check_model(str(dst))
    return {"method": "onnxruntime MatMulNBits bits=8 block 128 symmetric (weight-only)", "nodes": count}


def _nncf():
    try:
        import nncf
    except ImportError as exc:
        raise MissingExtraError("OpenVINO INT8 quantization", "int8", "nncf") from exc
    return nncf


@contextmanager
def _quiet_quantizers():
    """NNCF and onnxruntime's quantizers log every node at INFO; keep their warnings, drop the per-node lines."""
    if importlib.util.find_spec("nncf") is not None:
        import nncf  # noqa: F401  (it sets its logger's level on import: import first, then lower it)
    loggers = [logging.getLogger(n) for n in ("nncf", "onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _ov_weighted(model, op_type: str) -> list[str]:
    """Friendly names of `op_type` ops with a constant (weight) input, through Convert/Reshape/Multiply chains."""
    def constant_behind(node, depth: int = 0) -> bool:
        kind = node.get_type_name()
        if kind == "Constant":
            return True
        if depth < 4 and kind in ("Convert", "Reshape", "Multiply", "Subtract", "Transpose"):
            return all(constant_behind(node.input_value(i).get_node(), depth + 1) for i in range(node.get_input_size()))
        return False

    names = []
    for op in model.get_ops():
        if op.get_type_name() == op_type and any(constant_behind(op.input_value(i).get_node())
                                                 for i in range(op.get_input_size())):
            names.append(op.get_friendly_name())
    return names


def _ov_activation_matmuls(model) -> list[str]:
    weighted = set(_ov_weighted(model, "MatMul"))
    return [op.get_friendly_name() for op in model.get_ops()
            if op.get_type_name() == "MatMul" and op.get_friendly_name() not in weighted]


def ov_quantize_unet(src_onnx: Path, dst_xml: Path, recipe: str, calibration: UNetCalibrationSet,
                     traits: CpuInt8Traits) -> dict:
    """NNCF recipe on the UNet (read from the fp32 ONNX graph); writes openvino_model.xml/.bin."""
    import openvino as ov

    nncf = _nncf()
    # OpenVINO maps the graph's weight file and NNCF's statistics runs compile the model, which repacks the
    # weights into OpenVINO's own memory: the mapped file's pages would stay resident beside that copy (5 GiB of
    # the full-size UNet). They are clean file pages, so they are dropped as the quantization goes.
    with releasing_mapped_weights(src_onnx.parent):
        return _ov_quantize_unet(ov, nncf, src_onnx, dst_xml, recipe, calibration, traits)


def _ov_quantize_unet(ov, nncf, src_onnx: Path, dst_xml: Path, recipe: str, calibration: UNetCalibrationSet,
                      traits: CpuInt8Traits) -> dict:
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters, AdvancedSmoothQuantParameters,
                                                       OverflowFix)

    model = ov.Core().read_model(str(src_onnx))
    sensitive = [op.get_friendly_name() for op in model.get_ops()
                 if op.get_type_name() in ("Convolution", "MatMul") and _is_sensitive(op.get_friendly_name())]
    weighted_matmuls = _ov_weighted(model, "MatMul")
    activation_matmuls = _ov_activation_matmuls(model)
    overflow = OverflowFix.DISABLE if traits.vnni else OverflowFix.ENABLE
    dataset = nncf.Dataset(calibration)
    weight_only = []
    if recipe == "hybrid":
        weight_only = [n for n in weighted_matmuls if n not in sensitive]
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=nncf.IgnoredScope(
            types=["Convolution"], names=sensitive, validate=False))
        ignored = weighted_matmuls + activation_matmuls + sensitive
        advanced = AdvancedQuantizationParameters(  # SmoothQuant off (alpha -1) for both op kinds
            overflow_fix=overflow, smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=-1, matmul=-1))
    else:
        ignored = activation_matmuls + sensitive
        advanced = AdvancedQuantizationParameters(overflow_fix=overflow)
    model = nncf.quantize(model, dataset, subset_size=len(calibration), model_type=nncf.ModelType.TRANSFORMER,
                          ignored_scope=nncf.IgnoredScope(names=sorted(set(ignored)), validate=False),
                          advanced_parameters=advanced)
    ov.save_model(model, str(dst_xml), compress_to_fp16=False)
    del model
    return {"method": f"nncf {nncf.__version__}", "weight_only_int8_asym_nodes": len(weight_only),
            "w8a8": "Convolution" if recipe == "hybrid" else "Convolution + weighted MatMul",
            "kept_float": list(SENSITIVE_LAYERS) + ["attention activation x activation MatMuls"],
            "smooth_quant": "off" if recipe == "hybrid" else "nncf default", "overflow_fix": traits.overflow_fix,
            "model_type": "TRANSFORMER"}


def ov_weight_only(src_onnx: Path, dst_xml: Path) -> dict:
    """NNCF INT8 weight-only (all weighted layers) for the text encoder and VAE decoder."""
    import openvino as ov

    nncf = _nncf()
    # INT8 modes compress every weighted layer (MatMul, Gather, Convolution).
    model = nncf.compress_weights(ov.Core().read_model(str(src_onnx)), mode=nncf.CompressWeightsMode.INT8_ASYM)
    ov.save_model(model, str(dst_xml), compress_to_fp16=False)
    return {"method": f"nncf {nncf.__version__} compress_weights INT8_ASYM (weight-only)"}


# ------------------------------------------------------------------------------------------------ main path
@dataclass
class QuantizeReport:
    bundle: Path
    seconds: float
    figures: dict = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"INT8 bundle {self.bundle} written in {self.seconds:.1f} s"]
        for backend, f in self.figures.get("backends", {}).items():
            unet = f["unet"]["per_step"]
            worst = min(s["min_cosine"] for s in unet.values())
            rel = max(s["max_rel_error"] for s in unet.values())
            lines.append(f"  {backend} {f['recipe']}: UNet per-step cosine >= {worst:.4f}, rel error <= {rel:.3f}; "
                         f"frames PSNR {f['end_to_end']['mean_psnr_db']:.1f} dB (gate >= {FRAMES_INT8_MIN_PSNR_DB})")
            for name in ("text_encoder", "vae_decoder"):
                lines.append(f"    {name}: {f[name]['precision']} ({f[name].get('note', f[name].get('method', ''))})")
            adherence = f.get("adherence")
            if adherence:
                lines.append(f"    adherence int8 {adherence['int8']:.2f} ({adherence['int8_interval'][0]:.2f}-"
                             f"{adherence['int8_interval'][1]:.2f}) vs fp32 {adherence['fp32']:.2f} "
                             f"({adherence['fp32_interval'][0]:.2f}-{adherence['fp32_interval'][1]:.2f}), "
                             f"margin {ADHERENCE_INT8_MARGIN}, {adherence['clips']} clips")
        return "\n".join(lines)


def _copy_tree(src: Path, dst: Path, skip: Callable[[str], bool]) -> None:
    """Every file of `src` under `dst`, except those `skip` names (the graphs being replaced). Copies, not hard
    links: onnx refuses external data files with several links (its guard against hard-link attacks)."""
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src).as_posix()
        if not skip(rel):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dst / rel)


def _check_source(bundle: Bundle) -> None:
    for name, c in bundle.components.items():
        if c.quantization:
            raise InvalidArgumentError("bundle", f"'{bundle.root}' is already quantized ({name}: "
                                       f"{json.dumps(c.quantization)})",
                                       "quantize the fp32 bundle it was made from (lcm-edge export without --int8)")
        if c.precision != "fp32":
            raise InvalidArgumentError("bundle", f"'{bundle.root}' has {c.precision} graphs ({name})",
                                       "quantize an fp32 bundle (lcm-edge export --precision fp32)")


def check_recipe(backend: str, recipe: str) -> list[str]:
    if backend not in BACKEND_CHOICES:
        raise InvalidArgumentError("backend", f"unknown backend {backend!r}", f"use one of {list(BACKEND_CHOICES)}")
    backends = list(RECIPES) if backend == "both" else [backend]
    for b in backends:
        if recipe not in RECIPES[b]:
            raise InvalidArgumentError("recipe", f"{b} has no recipe {recipe!r}", f"use one of {list(RECIPES[b])}")
    return backends


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    versions = {"python": platform.python_version(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import nncf
        import openvino

        versions.update(nncf=nncf.__version__, openvino=openvino.__version__.split("-")[0])
    except ImportError:
        pass
    return versions


def _default_model_eval():
    """The default-model evaluation's own prompt set, scoring and interval (benchmarks/default_model_eval.py)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "default_model_eval.py"
    if not path.is_file():
        raise InvalidArgumentError("adherence_prompts", f"the default model's evaluation ({path}) is not installed "
                                   "(it ships with the source tree)", "run from a source checkout of lcm-edge, or "
                                   "pass adherence_prompts=0 to skip the behavioural gate")
    spec = importlib.util.spec_from_file_location("lcm_edge_default_model_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _is_default_model(bundle: Bundle) -> bool:
    return bool(bundle.provenance.get("source", {}).get("default_model"))


def quantize_bundle(bundle: str | os.PathLike, out: str | os.PathLike, *, backend: str = "both",
                    recipe: str = "hybrid", calibration_prompts: str | os.PathLike | None = None,
                    samples: int = 200, frames: int | None = None, height: int | None = None,
                    width: int | None = None, steps: int = 4, guidance_scale: float | None = None,
                    overwrite: bool = False, gate_clips: int = 2, adherence_prompts: int | None = None,
                    cpu_flags: Iterable[str] | None = None, memory_limit_bytes: int | None = None,
                    log: Callable[[str], None] = lambda message: None) -> QuantizeReport:
    """Quantize the fp32 bundle at `bundle` to INT8 for `backend` ("onnxruntime", "openvino" or "both") with
    `recipe` ("hybrid" or "full"), calibrated on `samples` UNet inputs recorded from the bundle's own sampling of
    the prompts in `calibration_prompts` (default: the shipped default model's list) at frames x height x width.

    gate_clips: clips for the held-out per-step gate and the end-to-end PSNR gate. adherence_prompts: clips for the
    behavioural gate of the shipped default model (default 60, all colour-shape-direction prompts; 0 skips it;
    other bundles have no detector and skip it). cpu_flags: override /proc/cpuinfo (tests). memory_limit_bytes:
    override the free memory the pre-check compares with (tests). Raises InvalidArgumentError naming the argument,
    InsufficientMemoryError, or QuantizationGateError; on any error nothing is left at `out`.
    """
    start = time.perf_counter()
    backends = check_recipe(backend, recipe)
    out = Path(out)
    source = load_bundle(bundle, verify_checksums=True)
    _check_source(source)
    if Path(bundle).resolve() == out.resolve():
        raise InvalidArgumentError("out", "is the bundle being quantized", "write the INT8 bundle to a new folder")
    prompts = read_prompts(DEFAULT_PROMPTS_FILE if calibration_prompts is None else calibration_prompts)
    plan = plan_calibration(source, samples=samples, frames=frames, height=height, width=width, steps=steps,
                            guidance_scale=guidance_scale)
    if isinstance(gate_clips, bool) or not isinstance(gate_clips, int) or gate_clips < 1:
        raise InvalidArgumentError("gate_clips", f"{gate_clips!r} is not a positive integer", "use e.g. 2")
    default_model = _is_default_model(source)
    if adherence_prompts is None:
        adherence_prompts = 60 if default_model else 0
    if adherence_prompts and not default_model:
        raise InvalidArgumentError("adherence_prompts", "the behavioural gate reads the shipped default model's "
                                   "shapes; this bundle is another model", "pass adherence_prompts=0")
    evaluation = _default_model_eval() if adherence_prompts else None
    _prepare_destination(out, overwrite)
    traits = int8_traits(read_cpu_flags() if cpu_flags is None else cpu_flags)
    resources = check_resources(source, plan, backends, out.parent, memory_limit_bytes, recipe)

    # The bundle is built in a claimed hidden sibling of `out` (renamed into place only after every gate), the
    # calibration samples and intermediate graphs in another; a killed run's leftovers are removed by the next.
    partial, scratch = Partial(out), Partial(out, suffix="-work")
    tmp, work = partial.path, scratch.path
    tmp.mkdir()
    work.mkdir()
    try:
        replaced = {"bundle.json"}
        for name in ("text_encoder", "unet", "vae_decoder"):
            c = source.components[name]
            if "onnxruntime" in backends and name != "vae_decoder":
                # The fused-attention graph reads the fp32 weights file: the INT8 graph replaces both.
                replaced.update(r for r in (c.onnx, c.onnx_data, c.onnx_fused) if r)
        _copy_tree(source.root, tmp, lambda rel: rel in replaced)

        # 2. Calibration and held-out inputs from the fp32 bundle's own loop (onnxruntime CPU runs the fp32 graph).
        log(f"recording {plan.samples} UNet inputs ({plan.clips_needed()} clips at {plan.frames}x{plan.height}x"
            f"{plan.width}, timesteps {list(plan.timesteps)})")
        fp32_ort = create_backend("onnxruntime", "cpu")
        calibration = record_unet_inputs(source, fp32_ort, prompts.prompts, plan, work / "calibration")
        held_out = record_unet_inputs(source, fp32_ort, prompts.prompts[::-1], plan, work / "held_out",
                                      seed_base=HELD_OUT_SEED_BASE, count=gate_clips * plan.steps)
        text_feeds = text_encoder_inputs(source, prompts.prompts, with_negative=plan.guidance_scale is not None)
        # The process's peak RSS after each phase, so a run that is too big for its machine says where.
        peaks = resources["peak_rss_gib_after"] = {}

        def mark(phase: str) -> None:
            peaks[phase] = round(peak_rss_gib(), 2)
            log(f"  peak RSS so far {peaks[phase]:.2f} GiB (after {phase})")

        mark("calibration")

        components = dict(source.components)
        figures: dict[str, Any] = {"backends": {}}
        written: set[str] = set()  # bundle files replaced by quantized graphs
        for b in backends:
            log(f"{b}: quantizing ({recipe})")
            with _quiet_quantizers():
                figures["backends"][b] = _quantize_for_backend(source, tmp, work / b, b, recipe, calibration,
                                                               held_out, text_feeds, traits, components, written,
                                                               mark)
        if "openvino" not in backends:
            # The OpenVINO backend would otherwise read the INT8 QDQ ONNX graph, which no gate checked on it:
            # give it the fp32 IR of the fp32 graph (as export --openvino writes it).
            for name, c in source.components.items():
                if c.openvino is None:
                    convert_to_openvino(source.root / c.onnx, tmp / name / "openvino_model.xml")
                    components[name] = dataclasses.replace(components[name], openvino=f"{name}/openvino_model.xml")

        provenance = dict(source.provenance)
        provenance["int8"] = {
            "quantizer": f"lcm_edge {lcm_edge.__version__}",
            "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "source_bundle_created_utc": source.provenance.get("created_utc"),
            "backends": backends, "recipe": recipe,
            "calibration": {**plan.to_dict(), "prompts_file": prompts.path.name, "prompts_sha256": prompts.sha256,
                            "prompts": len(prompts.prompts), "seed_base": CALIBRATION_SEED_BASE,
                            "held_out_seed_base": HELD_OUT_SEED_BASE, "held_out_inputs": len(held_out)},
            "cpu": {**traits.to_dict(), "machine": platform.machine(), "processor": platform.processor()},
            "versions": _versions(), "resources": resources, "figures": figures,
        }
        shutil.rmtree(work)
        # Hashes of the files copied unchanged from the verified source are reused, not recomputed.
        known = {rel: entry for rel, entry in source.files.items() if rel not in replaced and rel not in written}
        write_manifest(tmp, model=source.model, components=components, provenance=provenance, known=known)

        # 5. Whole-bundle gates on the written bundle: same prompt, latents and noise as the fp32 bundle.
        quantized = load_unpublished_bundle(tmp, verify_checksums=True)
        failures = []
        for b in backends:
            e2e = _end_to_end(source, quantized, b, prompts.prompts, plan, gate_clips)
            mark(f"{b} end-to-end gate")
            figures["backends"][b]["end_to_end"] = e2e
            if e2e["mean_psnr_db"] < FRAMES_INT8_MIN_PSNR_DB:
                failures.append(f"{b} frames: mean PSNR {e2e['mean_psnr_db']:.2f} dB < FRAMES_INT8_MIN_PSNR_DB "
                                f"{FRAMES_INT8_MIN_PSNR_DB} (per clip {e2e['psnr_db']})")
            if evaluation is not None:
                log(f"{b}: adherence on {adherence_prompts} prompts, fp32 and int8")
                adherence = _adherence(evaluation, source, quantized, b, adherence_prompts, plan.steps)
                figures["backends"][b]["adherence"] = adherence
                if adherence["int8"] < adherence["fp32"] - ADHERENCE_INT8_MARGIN:
                    failures.append(f"{b} adherence: int8 {adherence['int8']:.3f} < fp32 {adherence['fp32']:.3f} - "
                                    f"ADHERENCE_INT8_MARGIN {ADHERENCE_INT8_MARGIN}")
        if failures:
            raise QuantizationGateError("int8 bundle vs fp32 bundle", failures)
        write_manifest(tmp, model=source.model, components=components, provenance=provenance, known=known)
        load_unpublished_bundle(tmp, verify_checksums=True)
        partial.publish()
    finally:
        scratch.close()
        partial.close()
    return QuantizeReport(out, time.perf_counter() - start, figures)


def _quantize_for_backend(source: Bundle, tmp: Path, work: Path, backend: str, recipe: str,
                          calibration: UNetCalibrationSet, held_out: UNetCalibrationSet, text_feeds: list[dict],
                          traits: CpuInt8Traits, components: dict[str, ComponentInfo], written: set[str],
                          mark: Callable[[str], None]) -> dict:
    """Quantize, gate against the fp32 graph on the same runtime, and move the INT8 graphs into `tmp`."""
    work.mkdir(parents=True)
    runtime = create_backend(backend, None)
    figures: dict[str, Any] = {"recipe": recipe}
    failures: list[str] = []
    graph_key = "onnx" if backend == "onnxruntime" else "openvino"
    staged: dict[str, Path] = {}  # relative path in the bundle -> file to move there

    def fp32_session(name):
        return runtime.open(source.root, dataclasses.replace(source.components[name], openvino=None))

    def int8_session(name, folder: Path, graph: str):
        c = source.components[name]
        if backend == "onnxruntime":
            info = dataclasses.replace(c, onnx=graph, onnx_data=None, onnx_fused=None, openvino=None)
        else:
            info = dataclasses.replace(c, openvino=graph)
        return runtime.open(folder, info)

    # UNet
    unet = source.components["unet"]
    folder = work / "unet"
    folder.mkdir()
    if backend == "onnxruntime":
        external = unet.onnx_data is not None
        method = ort_quantize_unet(source.root / unet.onnx, folder / "model.onnx", recipe, calibration, traits,
                                   external=external, work=work / "ort_unet")
        graph = "model.onnx"
        staged[unet.onnx] = folder / "model.onnx"
        if external:
            staged[f"unet/{EXTERNAL_DATA_NAME}"] = folder / EXTERNAL_DATA_NAME
    else:
        method = ov_quantize_unet(source.root / unet.onnx, folder / "openvino_model.xml", recipe, calibration, traits)
        graph = "openvino_model.xml"
        staged["unet/openvino_model.xml"] = folder / "openvino_model.xml"
        staged["unet/openvino_model.bin"] = folder / "openvino_model.bin"
    mark(f"{backend} unet quantization")
    reference, quantized = fp32_session("unet"), int8_session("unet", folder, graph)
    per_step: dict[str, list] = {}
    for feeds in held_out:
        t = str(int(feeds["timestep"][0]))
        per_step.setdefault(t, []).append((reference.run(feeds)["out_sample"], quantized.run(feeds)["out_sample"]))
    del reference, quantized
    mark(f"{backend} unet per-step gate")
    figures["unet"] = {"precision": "int8", **method, "per_step": {}}
    for t, pairs in per_step.items():
        figures["unet"]["per_step"][t], fails = _gate_figures(UNET_INT8_GATE, f"{backend} unet t={t}", pairs)
        failures += fails

    # Text encoder: weight-only INT8 on both runtimes.
    te = source.components["text_encoder"]
    folder = work / "text_encoder"
    folder.mkdir()
    if backend == "onnxruntime":
        method = ort_weight_only(source.root / te.onnx, folder / "model.onnx", external=te.onnx_data is not None)
        graph, files = "model.onnx", {te.onnx: folder / "model.onnx"}
    else:
        method = ov_weight_only(source.root / te.onnx, folder / "openvino_model.xml")
        graph = "openvino_model.xml"
        files = {f"text_encoder/openvino_model.{ext}": folder / f"openvino_model.{ext}" for ext in ("xml", "bin")}
    reference, quantized = fp32_session("text_encoder"), int8_session("text_encoder", folder, graph)
    pairs = [(reference.run(f)["last_hidden_state"], quantized.run(f)["last_hidden_state"]) for f in text_feeds]
    gate, fails = _gate_figures(TEXT_ENCODER_INT8_GATE, f"{backend} text_encoder", pairs)
    figures["text_encoder"] = {"precision": "int8-weight-only", **method, **gate}
    failures += fails
    staged.update(files)

    # VAE decoder: weight-only INT8 on OpenVINO where it holds its gate; onnxruntime has no weight-only
    # convolution kernel (its INT8 Conv needs quantized activations, which is W8A8, not weight-only): fp32.
    vae = source.components["vae_decoder"]
    if backend == "openvino":
        folder = work / "vae_decoder"
        folder.mkdir()
        method = ov_weight_only(source.root / vae.onnx, folder / "openvino_model.xml")
        reference, quantized = fp32_session("vae_decoder"), int8_session("vae_decoder", folder, "openvino_model.xml")
        from .tiny_decoder import unit_frames  # imports torch, which the rest of quantize does not need

        psnrs = []
        for feeds in held_out:  # decode the recorded UNet inputs' latents (two frames each) as uint8 frames
            latents = feeds["sample"][:1, :, :2]
            psnrs.append(frames_psnr(*((unit_frames(session, latents, source.model.vae_scaling_factor) * 255)
                                       .round().astype(np.uint8) for session in (reference, quantized))))
        del reference, quantized
        worst = min(psnrs)
        if worst >= VAE_DECODER_INT8_MIN_PSNR_DB:
            figures["vae_decoder"] = {"precision": "int8-weight-only", **method, "min_psnr_db": worst,
                                      "gate_min_psnr_db": VAE_DECODER_INT8_MIN_PSNR_DB}
            staged.update({f"vae_decoder/openvino_model.{ext}": folder / f"openvino_model.{ext}"
                           for ext in ("xml", "bin")})
        else:
            figures["vae_decoder"] = {"precision": "fp32", "note": f"weight-only INT8 read {worst:.1f} dB < "
                                      f"VAE_DECODER_INT8_MIN_PSNR_DB {VAE_DECODER_INT8_MIN_PSNR_DB}: kept fp32"}
    else:
        figures["vae_decoder"] = {"precision": "fp32", "note": "onnxruntime has no weight-only INT8 convolution"}

    if failures:
        raise QuantizationGateError(f"{backend} {recipe} int8 graphs vs fp32", failures)

    # Move the gated graphs into the bundle and record each graph's precision in the manifest.
    for rel, path in staged.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, tmp / rel)
        written.add(rel)
    for name in ("text_encoder", "unet", "vae_decoder"):
        c = components[name]
        precision = figures[name]["precision"]
        if backend == "openvino":
            if precision == "fp32":
                if c.openvino is None:
                    convert_to_openvino(source.root / c.onnx, tmp / name / "openvino_model.xml")
            c = dataclasses.replace(c, openvino=f"{name}/openvino_model.xml")
        elif name == "unet":
            c = dataclasses.replace(c, onnx_fused=None, onnx_data=f"unet/{EXTERNAL_DATA_NAME}" if (tmp / "unet" / EXTERNAL_DATA_NAME)
                                    .exists() and source.components["unet"].onnx_data else None)
        if precision != "fp32":
            if graph_key == "onnx":
                c = dataclasses.replace(c, onnx_fused=None)
            c = dataclasses.replace(c, quantization={**(c.quantization or {}), graph_key: {
                "precision": "int8", "recipe": recipe if name == "unet" else "weight-only"}})
        components[name] = c
    return figures


def _pipeline(bundle: Bundle, backend: str):
    from lcm_edge.pipeline import AnimateLCMPipeline

    return AnimateLCMPipeline(bundle, create_backend(backend, None))


def _end_to_end(source: Bundle, quantized: Bundle, backend: str, prompts: Sequence[str], plan: CalibrationPlan,
                clips: int) -> dict:
    """Frames of the INT8 and fp32 bundles from the same prompt and seed (hence the same latents and noise)."""
    fp32, int8 = _pipeline(source, backend), _pipeline(quantized, backend)
    psnrs = []
    for i in range(clips):
        kwargs = dict(num_frames=plan.frames, height=plan.height, width=plan.width, num_inference_steps=plan.steps,
                      seed=E2E_SEED_BASE + i)
        prompt = prompts[(i * 7) % len(prompts)]
        psnrs.append(frames_psnr(fp32(prompt, **kwargs).frames, int8(prompt, **kwargs).frames))
    return {"psnr_db": [round(p, 2) for p in psnrs], "mean_psnr_db": float(np.mean(psnrs)),
            "gate_min_mean_psnr_db": FRAMES_INT8_MIN_PSNR_DB, "seed_base": E2E_SEED_BASE,
            "shape": [plan.frames, plan.height, plan.width], "steps": plan.steps}


def _adherence(evaluation, source: Bundle, quantized: Bundle, backend: str, prompts: int, steps: int) -> dict:
    """Prompt adherence (colour, shape and direction all right, read by the detector) of both bundles on the
    default-model evaluation's prompts at seeds ADHERENCE_SEED_BASE + i, with 95% Wilson intervals."""
    from lcm_edge.distill.synthetic import caption_for

    combos = evaluation.prompt_set(prompts)
    result = {"clips": len(combos), "seed_base": ADHERENCE_SEED_BASE, "steps": steps, "margin": ADHERENCE_INT8_MARGIN}
    for label, bundle in (("fp32", source), ("int8", quantized)):
        pipe = _pipeline(bundle, backend)
        clips = [pipe(caption_for(*combo), num_inference_steps=steps, seed=ADHERENCE_SEED_BASE + i).frames
                 for i, combo in enumerate(combos)]
        scores = evaluation.score(clips, combos)
        result[label] = scores["adherence"]
        result[f"{label}_scores"] = scores
        result[f"{label}_interval"] = list(evaluation.wilson_interval(scores["adherence"], len(combos)))
    return result

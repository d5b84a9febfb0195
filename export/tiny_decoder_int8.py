"""INT8 graphs for a bundle's tiny decoder (`quantize_tiny_decoder`): onnxruntime's, and OpenVINO's where it has an
IR, each gated twice on its own runtime.

Why: onnxruntime already runs the fp32 tiny decoder as well as fp32 allows. At ORT_ENABLE_ALL every Conv becomes a
com.microsoft.nchwc Conv with its ReLU and the residual Add+ReLU fused, and the nearest Resize an NCHWc Upsample;
TAESD's decoder then reads about the same fraction of the 2-core fp32 matmul peak as the full VAE decoder (see
benchmarks/research/README.md). But its FLOPs are 1/17.6 of SD1.5's VAE decoder (141 vs 2480 GFLOP per 512x512
frame), so no fp32 graph of it can be 20x faster than the full decoder on the same runtime. Exact rewrites that cut
FLOPs (the upsample + 3x3 conv pairs as one ConvTranspose, or as four 2x2 phase convs + DepthToSpace: 10% fewer
FLOPs) leave the NCHWc layout and ran slower. INT8 convolutions (u8 x s8, VNNI where the CPU has it) ran 2.6x
faster than fp32 on the same graph.

Recipe: static QDQ, weights int8 symmetric per output channel, activations uint8 MinMax-calibrated on latents from
the bundle's own sampler: one clip for each of the first TINY_INT8_CALIBRATION_CLIPS prompts of the calibration
prompt file (export.quantize's, default the shipped model's every colour/shape/direction list) at
TINY_INT8_CALIBRATION_SEED_BASE; 7-bit weights (reduce_range) on CPUs without VNNI, as export.quantize does. The
prompts must vary: calibrated on the add gate's two prompts (a red circle, a cat), unseen green and white clips
read 25 dB against the fp32 graph (activations clipped); on 8 prompts of the list, 47-49 dB on 11 unseen prompts.
OpenVINO (where the tiny decoder has an IR): NNCF post-training quantization of the fp32 IR on the same calibration
feeds (INT8 Convolutions, per-channel symmetric weights, per-tensor activations ranged over all feeds as the onnx
recipe's MinMax, fast bias correction; the NNCF overflow fix on CPUs without VNNI, as export.quantize does), saved as
a second IR beside the fp32 one. The shipped decoder reads 49.8 dB against its fp32 IR at the gate and 47.7-48.2 dB on
unseen prompts; TAESD's decoder (random weights, 512x512) decoded 3.9x faster than its fp32 IR on OpenVINO f32. The
two INT8 graphs are gated each on its own runtime; a bundle without an IR gets the onnx graph only.

Gates, for each INT8 graph on its own runtime (onnxruntime; OpenVINO CPU at f32 inference precision), on latents
from the bundle's own sampler for the next TINY_INT8_CHECK_CLIPS prompts of the same file (never calibrated on) at the
add gate's seeds (FIDELITY_SEED_BASE):
- the INT8 frames against the same runtime's fp32 tiny graph's (itself parity-gated against torch when it was
  added): PSNR >= TINY_DECODER_INT8_MIN_PSNR_DB;
- the INT8 frames against the full VAE decoder's on that runtime: TINY_DECODER_MIN_PSNR_DB and
  TINY_DECODER_FLICKER_MARGIN, the same fidelity gate every tiny decoder passes.
A failed gate raises TinyDecoderFidelityError and leaves the bundle as it was.

Replacing the graphs never leaves the bundle invalid: the gated INT8 files move in under new names, a manifest that
points the component at them replaces bundle.json, and only then do the fp32 files go (a second manifest drops them).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lcm_edge.atomic_output import Partial, recover
from lcm_edge.backends import create_backend
from lcm_edge.bundle import MANIFEST_NAME, Bundle, ComponentInfo, load_bundle, load_unpublished_bundle
from lcm_edge.errors import InvalidArgumentError

from .tiny_decoder import (TINY_DECODER, TINY_DECODER_FLICKER_MARGIN, TINY_DECODER_MIN_PSNR_DB,
                           TinyDecoderFidelityError, _write_manifest_atomically, check_fidelity, decoder_batches,
                           fidelity, sample_latents)

# INT8 frames against the fp32 tiny graph's, dB over [0, 1] pixels. On the shipped default model's decoder: 46.9-49
# dB on 11 unseen prompts of 16 frames (seeds 40123+), while the tiny decoder itself reads 25-36 dB against the full
# decoder on them; 40 dB is an error of 1/10 to 1/100 of the tiny decoder's own.
TINY_DECODER_INT8_MIN_PSNR_DB = 40.0
TINY_DECODER_INT8_RECIPE = "qdq-static"
TINY_DECODER_OV_INT8_RECIPE = "nncf-ptq"
TINY_INT8_CALIBRATION_SEED_BASE = 21_000  # the add gate samples 20_000.., the shipped model's tests 40_000..
TINY_INT8_CALIBRATION_CLIPS = 8
TINY_INT8_CHECK_CLIPS = 4
INT8_GRAPH = f"{TINY_DECODER}/model_int8.onnx"
INT8_IR = f"{TINY_DECODER}/openvino_model_int8.xml"


def _ir_files(xml: str | os.PathLike) -> tuple[Path, Path]:
    """An OpenVINO IR's two files: the graph (.xml) and its weights (.bin)."""
    return Path(xml), Path(xml).with_suffix(".bin")


def _calibration_feeds(calibration: Sequence[np.ndarray], vae_scaling_factor: float) -> list[dict[str, np.ndarray]]:
    """The decoder feeds of (1, c, f, h, w) calibration latents, shared by both runtimes' quantizers."""
    return [{"latent_sample": b} for clip in calibration for b in decoder_batches(clip, vae_scaling_factor)]


def quantize_graph(src: str | os.PathLike, dst: str | os.PathLike, calibration: Sequence[np.ndarray],
                   vae_scaling_factor: float) -> dict[str, Any]:
    """Static QDQ INT8 copy of the tiny decoder graph `src` at `dst`, calibrated on (1, c, f, h, w) latents.
    Returns the method record for the provenance."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    from .quantize import _quiet_quantizers, _versions, int8_traits, read_cpu_flags

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = _calibration_feeds(calibration, vae_scaling_factor)
            self.index = 0

        def get_next(self):
            if self.index == len(self.feeds):
                return None
            self.index += 1
            return self.feeds[self.index - 1]

    traits = int8_traits(read_cpu_flags())
    pre = Path(dst).with_name(Path(dst).stem + ".pre.onnx")
    try:
        with _quiet_quantizers():
            # Shape inference and onnxruntime's basic fusions first, as onnxruntime's quantizer asks.
            quant_pre_process(str(src), str(pre))
            quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=traits.reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    finally:
        pre.unlink(missing_ok=True)
    onnx.checker.check_model(str(dst))
    return {"method": f"onnxruntime {_versions()['onnxruntime']} quant_pre_process + quantize_static QDQ",
            "recipe": TINY_DECODER_INT8_RECIPE, "activations": "uint8 asymmetric, MinMax",
            "weights": "int8 symmetric per channel", "cpu": traits.to_dict(),
            "calibration_frames": int(sum(c.shape[2] for c in calibration))}


def quantize_ir(src: str | os.PathLike, dst: str | os.PathLike, calibration: Sequence[np.ndarray],
                vae_scaling_factor: float) -> dict[str, Any]:
    """NNCF INT8 copy of the tiny decoder's fp32 OpenVINO IR `src` (.xml) at `dst` (.xml + .bin), calibrated on the same
    (1, c, f, h, w) latents as quantize_graph. Returns the method record for the provenance."""
    import openvino as ov

    from .quantize import _nncf, _quiet_quantizers, int8_traits, read_cpu_flags

    nncf = _nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    traits = int8_traits(read_cpu_flags())
    feeds = _calibration_feeds(calibration, vae_scaling_factor)
    with _quiet_quantizers():
        # NNCF's defaults for a CNN (INT8 Convolutions, weights symmetric per output channel, activations per tensor,
        # signed or unsigned as calibrated, fast bias correction) but activation ranges over all feeds, as the onnx
        # recipe's MinMax: NNCF's default averages each feed's range, which clips the colours only some clips have.
        # Every feed calibrates (subset_size).
        model = nncf.quantize(ov.Core().read_model(str(src)), nncf.Dataset(feeds), subset_size=len(feeds),
                              advanced_parameters=AdvancedQuantizationParameters(
                                  overflow_fix=OverflowFix(traits.overflow_fix),
                                  activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX))
    ov.save_model(model, str(dst), compress_to_fp16=False)
    return {"method": f"nncf {nncf.__version__} quantize (openvino {ov.__version__.split('-')[0]})",
            "recipe": TINY_DECODER_OV_INT8_RECIPE, "activations": "int8 symmetric per tensor, MinMax over all feeds",
            "weights": "int8 symmetric per channel", "fast_bias_correction": True, "cpu": traits.to_dict(),
            "calibration_frames": int(sum(c.shape[2] for c in calibration))}


def _prompts(calibration_prompts: str | os.PathLike | None) -> tuple[str, ...]:
    """Calibration prompts, then check prompts: the file needs enough for both, the check ones never calibrated on."""
    from .calibration import DEFAULT_PROMPTS_FILE, read_prompts

    prompts = read_prompts(DEFAULT_PROMPTS_FILE if calibration_prompts is None else calibration_prompts).prompts
    need = TINY_INT8_CALIBRATION_CLIPS + TINY_INT8_CHECK_CLIPS
    if len(prompts) < need:
        raise InvalidArgumentError("calibration_prompts", f"has {len(prompts)} prompts; the INT8 recipe samples "
                                   f"{TINY_INT8_CALIBRATION_CLIPS} to calibrate and {TINY_INT8_CHECK_CLIPS} others "
                                   "for its gates", f"list at least {need} varied prompts, one a line")
    return prompts


def _check_arguments(bundle: Bundle, check_latents, calibration_latents,
                     min_int8_psnr_db) -> tuple[ComponentInfo, tuple[str, ...]]:
    """The tiny decoder's manifest entry and the graphs to quantize: "onnx", and "openvino" where it has an IR, each
    unless it is INT8 already."""
    info = bundle.components.get(TINY_DECODER)
    if info is None:
        raise InvalidArgumentError("bundle", f"{bundle.root} has no tiny decoder ({TINY_DECODER})",
                                   "add one first (lcm_edge.export.tiny_decoder.add_tiny_decoder)")
    present = ("onnx", "openvino") if info.openvino is not None else ("onnx",)
    graphs = tuple(g for g in present if not (info.quantization or {}).get(g))
    if not graphs:
        raise InvalidArgumentError("bundle", f"the tiny decoder's graphs in {bundle.root} are already int8 ("
                                   + ", ".join(f"{g} {info.graph_precision(g)}" for g in present) + ")",
                                   "quantize a bundle whose tiny decoder is fp32")
    if "openvino" in graphs:
        from .quantize import _nncf

        _nncf()  # the IR is quantized too: no NNCF is an error before any work, never an onnx-only bundle
    if info.precision != "fp32":
        raise InvalidArgumentError("bundle", f"the tiny decoder is {info.precision}, the INT8 recipe starts from fp32",
                                   "re-add the tiny decoder in fp32")
    if not (isinstance(min_int8_psnr_db, (int, float)) and np.isfinite(min_int8_psnr_db)):
        raise InvalidArgumentError("min_int8_psnr_db", f"{min_int8_psnr_db!r} is not a finite number",
                                   f"pass e.g. {TINY_DECODER_INT8_MIN_PSNR_DB}")
    m = bundle.model
    for argument, clips in (("check_latents", check_latents), ("calibration_latents", calibration_latents)):
        if clips is None:
            continue
        if len(clips) == 0:
            raise InvalidArgumentError(argument, "is empty", "pass at least one clip, or None to sample them")
        for i, latents in enumerate(clips):
            if not isinstance(latents, np.ndarray) or latents.ndim != 5 or latents.shape[:2] != (1, m.latent_channels):
                raise InvalidArgumentError(argument, f"[{i}] has shape {getattr(latents, 'shape', None)}",
                                           f"pass (1, {m.latent_channels}, frames, h, w) latents")
    return info, graphs


@dataclasses.dataclass
class TinyInt8Report:
    """`figures`: the provenance record (tiny_decoder.int8): the onnx graph's figures, its OpenVINO IR's under
    "openvino"; `graphs`: the graphs this run quantized; `has_ir`: whether the tiny decoder has an OpenVINO IR."""
    bundle: Path
    figures: dict[str, Any]
    graphs: tuple[str, ...] = ("onnx",)
    has_ir: bool = False

    def summary(self) -> str:
        lines = []
        for graph in self.graphs:
            f = self.figures if graph == "onnx" else self.figures["openvino"]
            text = (f"{TINY_DECODER} {graph} graph now INT8 ({f['recipe']}) in {self.bundle}: PSNR "
                    f"{f['psnr_vs_fp32_db']:.1f} dB against the fp32 tiny graph on {graph} (gate "
                    f"{f['min_int8_psnr_db']} dB)")
            full = f.get("fidelity")
            if full:
                text += (f"; {full['psnr_db']:.2f} dB against the full decoder, flicker {full['flicker_tiny']:.4f} vs "
                         f"{full['flicker_full']:.4f}")
            lines.append(text)
        if not self.has_ir:
            lines.append("  (the tiny decoder has no OpenVINO IR: only its onnx graph is INT8)")
        return "\n".join(lines)


def _gate(runtime: str, fp32, int8, open_full: Callable[[], Any], check_latents: Sequence[np.ndarray],
          vae_scaling_factor: float, figures: dict[str, Any], min_int8_psnr_db: float, min_psnr_db: float | None,
          flicker_margin: float) -> None:
    """Both gates of one runtime's INT8 graph (sessions `int8` and the fp32 tiny `fp32`; `open_full` opens the full
    decoder's, only when its gate runs), figures recorded into `figures`; raises TinyDecoderFidelityError."""
    against_fp32 = fidelity(fp32, int8, check_latents, vae_scaling_factor)
    figures["psnr_vs_fp32_db"] = against_fp32["psnr_db"]
    if not against_fp32["psnr_db"] >= min_int8_psnr_db:
        raise TinyDecoderFidelityError(
            "min_int8_psnr_db", f"the INT8 tiny decoder's {runtime} frames read {against_fp32['psnr_db']:.2f} dB "
            f"against the fp32 tiny decoder's < {min_int8_psnr_db} dB (TINY_DECODER_INT8_MIN_PSNR_DB)",
            "keep the fp32 tiny decoder, or calibrate on latents closer to what it decodes (calibration_latents)",
            figures)
    figures["fidelity"] = None
    if min_psnr_db is not None:
        figures["fidelity"] = fidelity(open_full(), int8, check_latents, vae_scaling_factor)
        check_fidelity(figures["fidelity"], argument="bundle", min_psnr_db=min_psnr_db, flicker_margin=flicker_margin)


def install_int8(root: str | os.PathLike, *, check_latents: Sequence[np.ndarray] | None = None,
                 calibration_latents: Sequence[np.ndarray] | None = None,
                 calibration_prompts: str | os.PathLike | None = None,
                 min_int8_psnr_db: float = TINY_DECODER_INT8_MIN_PSNR_DB,
                 min_psnr_db: float | None = TINY_DECODER_MIN_PSNR_DB,
                 flicker_margin: float = TINY_DECODER_FLICKER_MARGIN, threads: int | None = None) -> TinyInt8Report:
    """Replace the tiny decoder's onnx graph, and its OpenVINO IR where it has one, in the bundle folder `root` by
    their INT8 versions, in place (quantize_tiny_decoder is the entry point for users). A graph already INT8 is kept.
    `check_latents` / `calibration_latents`: (1, c, f, h, w) latents; by default the bundle samples one clip per
    prompt of `calibration_prompts` (a file, one prompt a line; default export.calibration's DEFAULT_PROMPTS_FILE):
    the first TINY_INT8_CALIBRATION_CLIPS at TINY_INT8_CALIBRATION_SEED_BASE to calibrate, the next
    TINY_INT8_CHECK_CLIPS at FIDELITY_SEED_BASE for the gates. min_psnr_db=None skips the gate against the full
    decoder (the INT8-vs-fp32 gate always runs). An IR needs NNCF (the int8 extra): MissingExtraError without it."""
    root = Path(root)
    bundle = load_unpublished_bundle(root, verify_checksums=True)
    info, graphs = _check_arguments(bundle, check_latents, calibration_latents, min_int8_psnr_db)
    prompts = _prompts(calibration_prompts)
    calibrated_on = "latents given" if calibration_latents is not None else list(prompts[:TINY_INT8_CALIBRATION_CLIPS])
    if calibration_latents is None:
        calibration_latents = sample_latents(bundle, prompts=prompts[:TINY_INT8_CALIBRATION_CLIPS],
                                             clips=TINY_INT8_CALIBRATION_CLIPS,
                                             seed_base=TINY_INT8_CALIBRATION_SEED_BASE, threads=threads)
    if check_latents is None:
        check_latents = sample_latents(bundle, prompts=prompts[TINY_INT8_CALIBRATION_CLIPS:],
                                       clips=TINY_INT8_CHECK_CLIPS, threads=threads)
    sf = bundle.model.vae_scaling_factor
    common = dict(min_int8_psnr_db=float(min_int8_psnr_db), check_clips=len(check_latents),
                  calibration_clips=len(calibration_latents), calibration_prompts=calibrated_on,
                  calibration_seed_base=TINY_INT8_CALIBRATION_SEED_BASE)
    gates = dict(min_int8_psnr_db=min_int8_psnr_db, min_psnr_db=min_psnr_db, flicker_margin=flicker_margin)
    full_info = bundle.components["vae_decoder"]
    target = root.parent / f"{root.name}.{TINY_DECODER}_int8"
    recover(target)
    partial = Partial(target)
    try:
        partial.path.mkdir()
        staged = partial.path
        # Each INT8 graph runs from the staging folder (a session only needs its graph's own files), under the
        # manifest entry it will have.
        quantization = dict(info.quantization or {})
        int8_info, staged_info = info, info
        moves: list[tuple[Path, Path]] = []  # staged file -> its place in the bundle
        record: dict[str, Any] = {} if "onnx" in graphs else dict((bundle.provenance.get("tiny_decoder") or {})
                                                                   .get("int8") or {})
        if "onnx" in graphs:
            figures = {**quantize_graph(root / info.onnx, staged / "model_int8.onnx", calibration_latents, sf),
                       **common}
            quantization["onnx"] = {"precision": "int8", "recipe": TINY_DECODER_INT8_RECIPE}
            int8_info = dataclasses.replace(int8_info, onnx=INT8_GRAPH)
            staged_info = dataclasses.replace(staged_info, onnx="model_int8.onnx")
            ort = create_backend("onnxruntime", "cpu", **({"threads": threads} if threads else {}))
            _gate("onnxruntime", ort.open(root, info), ort.open(staged, staged_info), lambda: ort.open(root, full_info),
                  check_latents, sf, figures, **gates)
            record.update(figures)
            moves.append((staged / "model_int8.onnx", root / INT8_GRAPH))
        if "openvino" in graphs:
            figures = {**quantize_ir(root / info.openvino, staged / "openvino_model_int8.xml", calibration_latents,
                                     sf), **common}
            quantization["openvino"] = {"precision": "int8", "recipe": TINY_DECODER_OV_INT8_RECIPE}
            int8_info = dataclasses.replace(int8_info, openvino=INT8_IR)
            staged_info = dataclasses.replace(staged_info, openvino="openvino_model_int8.xml")
            ov = create_backend("openvino", "CPU",
                                **({"config": {"INFERENCE_NUM_THREADS": threads}} if threads else {}))
            _gate("OpenVINO", ov.open(root, info), ov.open(staged, staged_info), lambda: ov.open(root, full_info),
                  check_latents, sf, figures, **gates)
            record["openvino"] = figures
            # The weights first: the graph that names them never sits in the bundle without them.
            moves += [(src, root / dst) for src, dst in zip(reversed(_ir_files(staged / "openvino_model_int8.xml")),
                                                            reversed(_ir_files(INT8_IR)))]
        int8_info = dataclasses.replace(int8_info, quantization=quantization)
        # 1. The gated files move in beside the fp32 ones; the manifest that points at them replaces the old one.
        for src, dst in moves:
            os.replace(src, dst)
        components = {**bundle.components, TINY_DECODER: int8_info}
        provenance = dict(bundle.provenance)
        provenance["tiny_decoder"] = {**(provenance.get("tiny_decoder") or {}), "int8": record}
        _write_manifest_atomically(root, bundle, components, provenance)
        # 2. Only now the fp32 files go, and a manifest without them.
        replaced = [info.onnx] if "onnx" in graphs else []
        if "openvino" in graphs:
            replaced += [p.as_posix() for p in _ir_files(info.openvino)]
        for rel in replaced:
            if rel in bundle.files:  # an IR without weights has no .bin
                (root / rel).unlink()
        _write_manifest_atomically(root, bundle, components, provenance)
    finally:
        partial.close()
    load_unpublished_bundle(root, verify_checksums=True)
    return TinyInt8Report(root, record, graphs, info.openvino is not None)


def quantize_tiny_decoder(bundle: str | os.PathLike, *, out: str | os.PathLike | None = None,
                          **options) -> TinyInt8Report:
    """Give `bundle`'s tiny decoder an INT8 onnxruntime graph, and an INT8 OpenVINO IR where it has an IR (in place),
    or a copy of the bundle at `out` (which must not exist; it appears under that name only once the INT8 graphs are
    in and gated). `options`: see install_int8."""
    if out is None:
        load_bundle(bundle, verify_checksums=False)  # refuses an export's temporary folder
        return install_int8(bundle, **options)
    out = Path(out)
    source = load_bundle(bundle, verify_checksums=True)
    _check_arguments(source, options.get("check_latents"), options.get("calibration_latents"),
                     options.get("min_int8_psnr_db", TINY_DECODER_INT8_MIN_PSNR_DB))
    _prompts(options.get("calibration_prompts"))
    if not out.parent.is_dir():
        raise InvalidArgumentError("out", f"folder '{out.parent}' does not exist", "create it first")
    recover(out)
    if out.exists():
        raise InvalidArgumentError("out", f"'{out}' already exists", "choose a new folder")
    with Partial(out) as partial:
        shutil.copytree(source.root, partial.path, ignore=shutil.ignore_patterns(f"{MANIFEST_NAME}.tmp"))
        report = install_int8(partial.path, **options)
        partial.publish()
    return dataclasses.replace(report, bundle=out)


__all__ = ["INT8_GRAPH", "INT8_IR", "TINY_DECODER_INT8_MIN_PSNR_DB", "TINY_DECODER_INT8_RECIPE",
           "TINY_DECODER_OV_INT8_RECIPE", "TINY_INT8_CALIBRATION_CLIPS", "TINY_INT8_CALIBRATION_SEED_BASE",
           "TINY_INT8_CHECK_CLIPS", "TinyInt8Report", "install_int8", "quantize_graph", "quantize_ir",
           "quantize_tiny_decoder"]

"""FLOP counts of a bundle's graphs, derived from the graphs themselves.

Method: run each graph once per small shape on onnxruntime (CPU, graph optimisations off, so the
nodes are the exported ones) with node profiling, and count 2 FLOPs per multiply-accumulate of every
Conv, MatMul, Gemm and fused attention node from the shapes the profile records (elementwise ops,
norms and softmax are not counted: they are a few percent of a UNet). The count of these graphs is
an exact polynomial in the clip's dimensions, so it is fitted at a few small shapes and checked at
another before it is used at the benchmark's shape (512x512x16 would take minutes to profile):

    UNet, per batch item:   c0 + c1 F + c2 F P + c3 F P^2 + c4 P F^2    (F frames, P latent pixels)
    VAE decoder (and a tiny decoder), per frame: c1 P + c2 P^2
    text encoder, per prompt: c0

F P: convolutions and projections at every level; F P^2: spatial self-attention; P F^2: temporal
attention; F: the per-frame text and time projections. tests/test_bench.py checks the result
against torch's FlopCounterMode on the same weights.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from ..errors import LcmEdgeError

# The fit must reproduce the held-out shape's count to this relative error, or the basis is wrong
# for this graph (an op whose cost grows another way) and the FLOP columns would mislead.
FLOP_FIT_MAX_REL_ERROR = 1e-6
UNET_BASIS = ("1", "F", "F*P", "F*P^2", "P*F^2")
VAE_BASIS = ("P", "P^2")


class FlopCountError(LcmEdgeError):
    """The FLOP formula could not be derived or did not reproduce a held-out shape."""


def _prod(shape) -> int:
    return int(np.prod([int(d) for d in shape], dtype=np.int64))


def node_flops(op: str, inputs: list[list[int]], outputs: list[list[int]], attrs: Mapping | None = None) -> int:
    """2 x multiply-accumulates of one profiled node; 0 for ops that are not counted."""
    if not outputs:
        return 0
    out = outputs[0]
    if op in ("Conv", "FusedConv", "QLinearConv", "ConvInteger"):
        weight = inputs[3] if op == "QLinearConv" else inputs[1]
        return 2 * _prod(out) * _prod(weight[1:])  # weight (Cout, Cin/groups, kh, kw)
    if op in ("MatMul", "FusedMatMul", "MatMulInteger", "QLinearMatMul", "MatMulNBits", "DynamicQuantizeMatMul"):
        return 2 * _prod(out) * int(inputs[0][-1])  # K = the contracted axis of the left input
    if op == "Gemm":
        return 2 * _prod(out) * int(inputs[0][-1])
    if op in ("MultiHeadAttention", "Attention") and len(inputs) >= 3:
        q, k = inputs[0], inputs[1]
        if len(q) == 3 and len(k) == 3:  # (B, S, hidden) x (B, L, hidden): Q K^T and P V
            return 4 * int(q[0]) * int(q[1]) * int(k[1]) * int(q[2])
        if len(q) == 4 and len(k) == 4:  # (B, heads, S, d)
            return 4 * int(q[0]) * int(q[1]) * int(q[2]) * int(k[2]) * int(q[3])
    return 0


def _shapes(entries) -> list[list[int]]:
    return [list(next(iter(e.values()))) for e in entries or []]


def profile_flops(path: Path, feeds: Mapping[str, np.ndarray]) -> int:
    """Run the graph once with node profiling and sum node_flops over its nodes."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "profile")
        options.enable_cpu_mem_arena = False
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        session.run(None, dict(feeds))
        events = json.loads(Path(session.end_profiling()).read_text())
    total = 0
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        args = event["args"]
        total += node_flops(args["op_name"], _shapes(args.get("input_type_shape")),
                            _shapes(args.get("output_type_shape")))
    return total


def _terms(frames: int, pixels: int) -> dict[str, int]:
    return {"1": 1, "F": frames, "P": pixels, "F*P": frames * pixels, "F*P^2": frames * pixels**2,
            "P*F^2": pixels * frames**2, "P^2": pixels**2}


@dataclass(frozen=True)
class FlopFormula:
    basis: tuple[str, ...]
    coefficients: tuple[float, ...]
    per: str  # what one evaluation counts: "batch item", "frame", "prompt"
    fit_shapes: tuple[tuple[int, ...], ...]
    check_shape: tuple[int, ...]
    check_rel_error: float

    def evaluate(self, frames: int = 1, pixels: int = 1) -> float:
        terms = _terms(frames, pixels)
        return float(sum(c * terms[b] for b, c in zip(self.basis, self.coefficients)))

    @classmethod
    def from_dict(cls, d: Mapping) -> "FlopFormula":
        return cls(tuple(d["basis"]), tuple(d["coefficients"]), d["per"], tuple(map(tuple, d["fit_shapes"])),
                   tuple(d["check_shape"]), d["check_rel_error"])

    def to_dict(self) -> dict:
        return {"basis": list(self.basis), "coefficients": list(self.coefficients), "per": self.per,
                "fit_shapes": [list(s) for s in self.fit_shapes], "check_shape": list(self.check_shape),
                "check_rel_error": self.check_rel_error}


def _fit(basis: tuple[str, ...], samples: list[tuple[tuple[int, int], int]], check: tuple[tuple[int, int], int],
         per: str, name: str) -> FlopFormula:
    a = np.array([[_terms(f, p)[b] for b in basis] for (f, p), _ in samples], dtype=np.float64)
    y = np.array([flops for _, flops in samples], dtype=np.float64)
    coefficients, *_ = np.linalg.lstsq(a, y, rcond=None)
    coefficients = np.round(coefficients, 3)  # counts are integers per term; keep the fit's noise out
    (frames, pixels), expected = check
    formula = FlopFormula(basis, tuple(float(c) for c in coefficients), per,
                          tuple(s for s, _ in samples), (frames, pixels), 0.0)
    got = formula.evaluate(frames, pixels)
    rel = abs(got - expected) / max(expected, 1)
    if rel > FLOP_FIT_MAX_REL_ERROR:
        raise FlopCountError(f"{name}: the FLOP formula {dict(zip(basis, coefficients))} gives {got:.6g} at "
                             f"{frames} frames x {pixels} latent pixels, the graph counts {expected}; relative error "
                             f"{rel:.2e} > FLOP_FIT_MAX_REL_ERROR {FLOP_FIT_MAX_REL_ERROR}. Fix: report this graph; "
                             "the benchmark's GFLOP/s columns cannot be trusted for it")
    return FlopFormula(basis, formula.coefficients, per, formula.fit_shapes, formula.check_shape, rel)


def bundle_flops(bundle_root: str | Path, progress: Callable[[str], None] = lambda msg: None) -> dict[str, FlopFormula]:
    """FLOP formulas of a bundle's text encoder, UNet and VAE decoder (see the module docstring)."""
    from ..bundle import load_bundle

    bundle = load_bundle(bundle_root, verify_checksums=False)
    m = bundle.model
    rng = np.random.default_rng(0)
    latent_multiple = m.size_multiple // m.vae_scale_factor  # latent pixels per UNet level step
    formulas = {}

    te = bundle.components["text_encoder"]
    progress("FLOPs: text encoder")
    ids = np.zeros((1, m.text_max_length), dtype=np.int64)
    te_flops = profile_flops(bundle.root / te.onnx, {"input_ids": ids})
    formulas["text_encoder"] = FlopFormula(("1",), (float(te_flops),), "prompt", ((1, 1),), (1, 1), 0.0)

    unet = bundle.components["unet"]
    emb = rng.standard_normal((1, m.text_max_length, m.text_hidden_size), dtype=np.float32)

    def unet_count(frames: int, h_mult: int, w_mult: int) -> tuple[tuple[int, int], int]:
        h, w = h_mult * latent_multiple, w_mult * latent_multiple
        progress(f"FLOPs: UNet at {frames} frames x {h}x{w} latents")
        sample = rng.standard_normal((1, m.latent_channels, frames, h, w), dtype=np.float32)
        return (frames, h * w), profile_flops(bundle.root / unet.onnx, {
            "sample": sample, "timestep": np.array([999.0], np.float32), "encoder_hidden_states": emb})

    frames_max = max(1, min(4, m.max_frames))
    plan = [(1, 1, 1), (2, 1, 1), (3, 1, 1), (1, 2, 1), (2, 2, 1), (1, 2, 2), (3, 2, 2)]
    plan = [(min(f, frames_max), h, w) for f, h, w in plan]
    samples = [unet_count(*shape) for shape in dict.fromkeys(plan)]
    formulas["unet"] = _fit(UNET_BASIS, samples, unet_count(min(2, frames_max), 3, 1), "batch item", "unet")

    for name in ("vae_decoder", "vae_decoder_tiny"):  # the tiny decoder where the bundle has one
        if name not in bundle.components:
            continue
        decoder = bundle.components[name]

        def vae_count(h_mult: int, w_mult: int) -> tuple[tuple[int, int], int]:
            h, w = h_mult * latent_multiple, w_mult * latent_multiple
            progress(f"FLOPs: {name} at {h}x{w} latents")
            latent = rng.standard_normal((1, m.latent_channels, h, w), dtype=np.float32)
            return (1, h * w), profile_flops(bundle.root / decoder.onnx, {"latent_sample": latent})

        samples = [vae_count(1, 1), vae_count(2, 1), vae_count(2, 2)]
        formulas[name] = _fit(VAE_BASIS, samples, vae_count(3, 1), "frame", name)
    return formulas


def clip_flops(formulas: Mapping[str, FlopFormula], *, frames: int, height: int, width: int, vae_scale_factor: int,
               steps: int, guidance: float, decoded_frames: int, decoder: str = "full") -> dict[str, float]:
    """FLOPs of one clip's stages: text encoder, one UNet step, the decode of `decoded_frames` by the full VAE
    decoder or the tiny one."""
    pixels = (height // vae_scale_factor) * (width // vae_scale_factor)
    batch = 2 if guidance > 1.0 else 1
    unet_step = batch * formulas["unet"].evaluate(frames, pixels)
    return {"text_encoder": batch * formulas["text_encoder"].evaluate(),
            "unet_step": unet_step, "unet_total": steps * unet_step,
            "vae_decode": decoded_frames * formulas["vae_decoder_tiny" if decoder == "tiny" else "vae_decoder"]
            .evaluate(1, pixels)}

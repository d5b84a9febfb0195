"""In-memory diffusers components -> a verified bundle folder.

Recipe: 1. check the components fit together; 2. trace each graph to ONNX; 3. gate each
against torch on onnxruntime at two frame counts and two resolutions; 4. optionally convert
to OpenVINO IR and gate again; 5. write tokenizer, scheduler and configs; 6. hash every file
into bundle.json; 7. read the bundle back with the runtime's own loader, then rename the
temporary folder into place. A failure at any step leaves no folder under the final name.
Steps 2-4 are one loop over the graphs' specs (specs.sd_graphs), through graph_export.export_graph.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

import lcm_edge
from lcm_edge.atomic_output import Partial, recover
from lcm_edge.backends import create_backend
from lcm_edge.bundle import (SCHEDULER_CONFIG, TOKENIZER_DIR, ComponentInfo, ModelInfo, check_default_timesteps,
                             load_unpublished_bundle, write_manifest)
from lcm_edge.errors import InvalidArgumentError, LcmEdgeError, OutputWriteError, ParityError
from lcm_edge.scheduler import SchedulerConfig
from lcm_edge.tokenizer import CLIPTokenizer as RuntimeTokenizer

from .attention import FUSED_OP_KEY, check_attention
from .graph_export import ExportedGraph, export_graph, write_json
from .onnx_io import OPSET
from .openvino_ir import openvino_gate_backend
from .parity import ParityReport
from .precision import check_precision
from .specs import sd_graphs

TOKENIZER_GATE_PROMPTS = (
    "", "a red circle moving right", "A photo of an astronaut riding a horse on Mars, 4k, highly detailed!",
    "It's   a\tcafé — naïve façade, 3.14 & 1,000 <b>bold</b> &amp; emoji 🙂", "日本語のテキスト",
    " ".join(["long"] * 90), "<|STARTOFTEXT|> <|ENDOFTEXT|> hi!",
)


@dataclass
class ExportReport:
    bundle: Path
    seconds: float
    parity: dict[str, ParityReport] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"bundle {self.bundle} written in {self.seconds:.1f} s"]
        for key, report in self.parity.items():
            lines.append(f"  {key}: worst max abs {report.worst_abs():.3g} "
                         f"(tolerance {report.tolerance.name}: atol {report.tolerance.atol}, "
                         f"rtol {report.tolerance.rtol})")
        return "\n".join(lines)


def write_tokenizer_files(tokenizer, folder: Path) -> None:
    """vocab.json + merges.txt + tokenizer_config.json from a transformers CLIP tokenizer.

    transformers 5.x saves only tokenizer.json, so the BPE tables are read from its backend.
    """
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    if model.get("type") != "BPE":
        raise InvalidArgumentError("tokenizer", f"tokenizer model is {model.get('type')}, not CLIP's BPE",
                                   "pass the CLIPTokenizer from the model's tokenizer/ folder")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": int(tokenizer.model_max_length),
        "bos_token": str(tokenizer.bos_token), "eos_token": str(tokenizer.eos_token),
        "pad_token": str(tokenizer.pad_token), "unk_token": str(tokenizer.unk_token),
        "do_lower_case": True,
        # How each special token is matched in a prompt (e.g. after lowercasing or not) lives
        # here; plain strings above would lose it and change ids for prompts that type them.
        "added_tokens_decoder": {
            str(a["id"]): {key: a[key] for key in ("content", "normalized", "special", "lstrip", "rstrip",
                                                   "single_word")}
            for a in state["added_tokens"]
        },
    })


def _check_tokenizer(tokenizer, folder: Path) -> None:
    """Gate: the runtime tokenizer gives transformers' ids on a fixed prompt set."""
    runtime = RuntimeTokenizer.from_folder(folder)
    failures = []
    for prompt in TOKENIZER_GATE_PROMPTS:
        expected = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                             truncation=True).input_ids
        got = runtime.encode(prompt).input_ids.tolist()
        if got != list(expected):
            failures.append(f"tokenizer ids differ for {prompt!r}")
    if failures:
        raise ParityError("tokenizer runtime vs transformers", failures)


def _as_motion_unet(unet: torch.nn.Module, motion_adapter: torch.nn.Module | None) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel, UNetMotionModel

    if isinstance(unet, UNetMotionModel):
        if motion_adapter is not None:
            raise InvalidArgumentError("motion_adapter", "given with a UNetMotionModel that already has one",
                                       "pass either a UNetMotionModel, or a UNet2DConditionModel + MotionAdapter")
        return unet
    if isinstance(unet, UNet2DConditionModel):
        if motion_adapter is None:
            raise InvalidArgumentError("motion_adapter", "missing for a 2D UNet",
                                       "pass the MotionAdapter (e.g. AnimateLCM's) to inflate the UNet")
        return UNetMotionModel.from_unet2d(unet, motion_adapter)
    raise InvalidArgumentError("unet", f"{type(unet).__name__} is not a diffusers UNetMotionModel or "
                               "UNet2DConditionModel", "load the UNet with diffusers")


def _motion_max_frames(unet: torch.nn.Module) -> int:
    config = unet.config
    value = config.get("motion_max_seq_length")
    if not isinstance(value, int) or value < 1:
        raise InvalidArgumentError("unet", "its config has no motion_max_seq_length",
                                   "pass a UNetMotionModel or a MotionAdapter from diffusers")
    return value


def _prepare_destination(out: Path, overwrite: bool) -> None:
    if not out.parent.is_dir():
        raise InvalidArgumentError("out", f"folder '{out.parent}' does not exist", "create it first")
    try:
        # What an export to this target that was killed left behind goes first: its temporary folder, and a
        # previous bundle it had moved aside (put back). Claiming a temporary name proves the folder writable.
        recover(out)
        Partial(out).close()
    except OSError as exc:
        raise InvalidArgumentError("out", f"folder '{out.parent}' is not writable ({exc.strerror or exc})",
                                   "export to a folder you can write to") from exc
    if out.exists() and not overwrite:
        raise InvalidArgumentError("out", f"'{out}' already exists", "choose a new folder or pass overwrite=True")


def export_bundle(out: str | os.PathLike, *, unet: torch.nn.Module, vae: torch.nn.Module,
                  text_encoder: torch.nn.Module, tokenizer, scheduler_config: SchedulerConfig | Mapping[str, Any],
                  motion_adapter: torch.nn.Module | None = None, openvino: bool = False,
                  default_frames: int = 16, default_fps: int = 8, external_data: bool | None = None,
                  provenance: Mapping[str, Any] | None = None, overwrite: bool = False,
                  seed: int = 0, precision: str = "fp32", release_torch: bool = False,
                  default_timesteps: Mapping[int, Sequence[int]] | None = None,
                  attention: str = "fused", tiny_decoder=None) -> ExportReport:
    """Export components to a bundle at `out`; every graph passes its parity gate or nothing is written.

    precision: "fp32", or "fp16" (UNet and text encoder as fp16 graphs, OpenVINO IR with fp16
    weights; the VAE decoder stays fp32, see precision.py). Each fp16 graph is gated against
    fp32 torch with its own tolerance, after the fp32 graph it comes from passed the fp32 gate.
    release_torch: move each torch model to the `meta` device once its graph is traced and its
    reference outputs are computed, so torch's copy of the weights is freed before onnxruntime
    and OpenVINO load theirs (halves peak memory at full size). The models are unusable afterwards.
    default_timesteps: {steps: [t_1, ..., t_steps]}, schedules tuned for this model; the runtime samples a
    generation of that many steps at them unless the caller passes timesteps (bundle.json model.default_timesteps).
    attention: "fused" (default) writes the UNet and VAE decoder twice over one weights file: model_fused.onnx with
    onnxruntime's MultiHeadAttention (onnxruntime CPU/CUDA/DirectML run it; it never builds the full score
    tensor) and model.onnx with plain ops (TensorRT, onnxruntime's OpenVINO EP, and the OpenVINO IR, which fuses
    them itself); both are gated. "plain" writes model.onnx only, as before. See export/attention.py.
    tiny_decoder: TAESD-format decoder weights (a path, see export/tiny_decoder.py, or TinyDecoderWeights) to add as
    the optional vae_decoder_tiny, behind the parity gates and the fidelity gate against this VAE's decoder.
    """
    start = time.perf_counter()
    out = Path(out)
    check_precision(precision)
    check_attention(attention)
    if attention == "fused" and external_data is False:
        raise InvalidArgumentError("external_data", "False with attention='fused', whose fused and plain graphs "
                                   "share one external weights file", "leave external_data=None, or pass "
                                   "attention='plain' for graphs with inline weights")
    _prepare_destination(out, overwrite)

    # 1. Check the components fit together, derive the model facts the runtime needs, and the graphs to export.
    if not isinstance(scheduler_config, SchedulerConfig):
        scheduler_config = SchedulerConfig.from_dict(dict(scheduler_config), source="scheduler_config")
    motion_unet = _as_motion_unet(unet, motion_adapter).eval().float()
    vae = vae.eval().float()
    text_encoder = text_encoder.eval().float()
    model = _model_info(motion_unet, vae, text_encoder, tokenizer, scheduler_config, default_frames=default_frames,
                        default_fps=default_fps, default_timesteps=default_timesteps)
    if tiny_decoder is not None:  # read and fit-checked before any tracing
        from .tiny_decoder import TinyDecoderWeights, check_fit, load_tiny_decoder

        if not isinstance(tiny_decoder, TinyDecoderWeights):
            tiny_decoder = load_tiny_decoder(tiny_decoder, argument="tiny_decoder")
        check_fit(tiny_decoder, model, "tiny_decoder")
    graphs = sd_graphs(motion_unet, vae, text_encoder, model)
    rng = np.random.default_rng(seed)

    # A claimed `.NAME.partial-TOKEN` beside the target: its lock tells the next export to this target whether
    # this one is still running or was killed (lcm_edge.atomic_output).
    partial = Partial(out)
    tmp = partial.path
    tmp.mkdir()
    report = ExportReport(bundle=out, seconds=0.0)
    ort_backend = create_backend("onnxruntime", "cpu")
    ov_backend = openvino_gate_backend() if openvino else None  # one compiled shape at a time
    try:
        # 2-4. Each graph: trace, gate on onnxruntime, OpenVINO IR and its gate, fp16 and its gate, config.json.
        exported = {}
        for graph in graphs:
            exported[graph.spec.name] = export_graph(
                graph, tmp, rng=rng, ort_backend=ort_backend, ov_backend=ov_backend, precision=precision,
                attention=attention, external_data=external_data, release_torch=release_torch)
            report.parity.update(exported[graph.spec.name].parity)
        components = {name: e.info for name, e in exported.items()}
        # 5. Tokenizer (gated against transformers'), scheduler, optimum-style model index.
        _write_support_files(tmp, tokenizer, scheduler_config, components)
        # 6. Manifest with checksums and provenance (parity figures included).
        write_manifest(tmp, model=model, components=components, provenance=_provenance(
            provenance, precision=precision, attention=attention, exported=exported, parity=report.parity))

        # 6b. The optional tiny decoder, exported and gated into the finished (still unpublished) bundle.
        if tiny_decoder is not None:
            from .tiny_decoder import install_tiny_decoder

            report.parity.update(install_tiny_decoder(tmp, tiny_decoder, argument="tiny_decoder",
                                                      openvino=openvino).parity)

        # 7. Prove the runtime reads it, then publish atomically.
        load_unpublished_bundle(tmp)
        partial.publish()
    except OSError as exc:
        if isinstance(exc, LcmEdgeError):
            raise
        raise OutputWriteError(out, exc) from exc  # disk full, folder made read-only: the target is untouched
    finally:
        partial.close()
    report.seconds = time.perf_counter() - start
    return report


def _model_info(motion_unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module, tokenizer,
                scheduler_config: SchedulerConfig, *, default_frames: int, default_fps: int,
                default_timesteps: Mapping[int, Sequence[int]] | None) -> ModelInfo:
    """The facts the runtime needs (bundle.json model), after checking the components fit together."""
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    unet_downsamplers = len(motion_unet.config.down_block_types) - 1
    max_frames = _motion_max_frames(motion_unet)
    hidden = int(text_encoder.config.hidden_size)
    max_length = int(tokenizer.model_max_length)
    latent_channels = int(motion_unet.config.in_channels)
    if int(vae.config.latent_channels) != latent_channels:
        raise InvalidArgumentError("vae", f"latent_channels {vae.config.latent_channels} differs from the UNet's "
                                   f"in_channels {latent_channels}", "pass the VAE that belongs to this UNet")
    if int(motion_unet.config.cross_attention_dim) != hidden:
        raise InvalidArgumentError("text_encoder", f"hidden size {hidden} differs from the UNet's "
                                   f"cross_attention_dim {motion_unet.config.cross_attention_dim}",
                                   "pass the text encoder that belongs to this UNet")
    if not 1 <= default_frames <= max_frames:
        raise InvalidArgumentError("default_frames", f"{default_frames} is outside 1..{max_frames}",
                                   "use at most the motion module's motion_max_seq_length")
    sample_size = int(motion_unet.config.sample_size)
    return ModelInfo(
        vae_scaling_factor=float(vae.config.scaling_factor), vae_scale_factor=vae_scale,
        latent_channels=latent_channels, size_multiple=vae_scale * 2 ** unet_downsamplers,
        max_frames=max_frames, default_frames=default_frames, default_height=sample_size * vae_scale,
        default_width=sample_size * vae_scale, default_fps=default_fps, text_max_length=max_length,
        text_hidden_size=hidden, default_timesteps=check_default_timesteps(
            {} if default_timesteps is None else default_timesteps, scheduler_config),
    )


def _write_support_files(root: Path, tokenizer, scheduler_config: SchedulerConfig,
                         components: Mapping[str, ComponentInfo]) -> None:
    write_tokenizer_files(tokenizer, root / TOKENIZER_DIR)
    _check_tokenizer(tokenizer, root / TOKENIZER_DIR)
    write_json(root / SCHEDULER_CONFIG, scheduler_config.to_dict())
    write_json(root / "model_index.json", {
        "_class_name": "AnimateLCMPipeline", "_lcm_edge_version": lcm_edge.__version__,
        "scheduler": ["lcm_edge", "LCMScheduler"], "tokenizer": ["lcm_edge", "CLIPTokenizer"],
        **{name: ["lcm_edge", "OnnxGraph"] for name in components},
    })


def _provenance(source: Mapping[str, Any] | None, *, precision: str, attention: str,
                exported: Mapping[str, ExportedGraph], parity: Mapping[str, ParityReport]) -> dict[str, Any]:
    return {
        "exporter": f"lcm_edge {lcm_edge.__version__}",
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(), "opset": OPSET, "source": dict(source or {}),
        "precision": {"requested": precision, "components": {name: e.precision for name, e in exported.items()}},
        "attention": {
            "requested": attention, "fused_op": FUSED_OP_KEY,
            "components": {name: e.attention for name, e in exported.items() if e.attention is not None},
            # Which graph each runtime gets (lcm_edge.backends.ort_backend.select_onnx_graph decides).
            "graphs": {"onnxruntime cpu, cuda, directml": "onnx_fused (where present, else onnx)",
                       "onnxruntime tensorrt, openvino": "onnx",
                       "openvino": "openvino (converted from onnx), else onnx"},
        },
        "parity": {key: r.to_dict() for key, r in parity.items()},
    }


def _versions() -> dict[str, str]:
    import diffusers
    import onnx
    import onnxruntime
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}

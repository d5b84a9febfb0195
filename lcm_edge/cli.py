"""`lcm-edge` command line: generate, export, info. Argument parsing lives here only."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from . import __version__
from .backends import BACKENDS
from .errors import LcmEdgeError, run_command
from .pipeline import PromptTruncatedWarning, StepInfo


def _progress(info: StepInfo) -> None:
    width = 24
    done = int(width * (info.step + 1) / info.num_steps)
    print(f"\r  UNet [{'#' * done}{'.' * (width - done)}] step {info.step + 1}/{info.num_steps} "
          f"t={info.timestep} {info.seconds:.2f} s", end="" if info.step + 1 < info.num_steps else "\n",
          file=sys.stderr, flush=True)


def cmd_generate(args: argparse.Namespace) -> int:
    from .backends import create_backend
    from .bundle import load_bundle
    from .default import default_bundle_path
    from .pipeline import AnimateLCMPipeline, check_inputs
    from .video import check_output_path

    output = check_output_path(args.output, "--output")  # before minutes of work, not after
    if args.bundle is None:
        args.bundle = default_bundle_path()
    options = {}
    if args.threads is not None:
        options["threads"] = args.threads
    if args.cache_dir is not None:
        options["cache_dir"] = args.cache_dir
    if args.low_memory:
        if args.backend != "onnxruntime":
            raise LcmEdgeError("--low-memory: only the onnxruntime backend has a memory arena to turn off. "
                               "Fix: drop --low-memory, or use --backend onnxruntime")
        options["memory_arena"] = False
    t0 = time.perf_counter()
    bundle = load_bundle(args.bundle)
    generation = dict(num_frames=args.frames, height=args.height, width=args.width, num_inference_steps=args.steps,
                      guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt, seed=args.seed)
    check_inputs(bundle, args.prompt, **generation)  # before compiling graphs, which can take minutes
    pipe = AnimateLCMPipeline(bundle, create_backend(args.backend, args.device, **options))
    load_s = time.perf_counter() - t0
    print(f"loaded {args.bundle} on {pipe.backend.describe()} in {load_s:.2f} s", file=sys.stderr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PromptTruncatedWarning)
        result = pipe(args.prompt, **generation, callback=_progress)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    saved = result.save(output, fps=args.fps)
    f, h, w_, _ = result.frames.shape
    print(f"wrote {saved} ({f} frames, {w_}x{h}, seed {result.seed})")
    print(f"timings: {result.timings.summary()}")
    return 0


def _parse_default_timesteps(text: str) -> tuple[int, list[int]]:
    """--default-timesteps STEPS=T1,T2,..."""
    steps, _, timesteps = text.partition("=")
    try:
        return int(steps), [int(t) for t in timesteps.split(",")]
    except ValueError as exc:
        raise LcmEdgeError(f"--default-timesteps: cannot read {text!r}. Fix: write STEPS=T1,...,TSTEPS, largest "
                           "first, e.g. 4=999,699,399,199") from exc


def cmd_export(args: argparse.Namespace) -> int:
    from .errors import MissingExtraError

    try:
        from lcm_edge.export import LoraRequest, export_bundle, load_components
    except MissingExtraError as exc:
        raise LcmEdgeError(str(exc)) from exc
    if args.model is not None and args.base is not None:
        raise LcmEdgeError("MODEL_DIR and --base: both given. Fix: pass the model once, as --base DIR|FILE")
    base = args.base if args.base is not None else args.model
    if base is None:
        raise LcmEdgeError("--base: no model given. Fix: pass --base DIR (SD1.5 diffusers folder) or "
                           "--base FILE (single-file checkpoint, with --base-folder DIR for its tokenizer)")
    default_timesteps = {}
    for steps, timesteps in map(_parse_default_timesteps, args.default_timesteps):
        if steps in default_timesteps:
            raise LcmEdgeError(f"--default-timesteps: {steps} steps given twice. Fix: give one schedule per step count")
        default_timesteps[steps] = timesteps
    overrides = {}
    if args.original_inference_steps is not None:
        overrides["original_inference_steps"] = args.original_inference_steps
    if args.beta_schedule is not None:
        overrides["beta_schedule"] = args.beta_schedule
    motion_config = None
    if args.motion_config is not None:
        import json

        try:
            motion_config = json.loads(Path(args.motion_config).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise LcmEdgeError(f"--motion-config: cannot read '{args.motion_config}' ({exc}). Fix: pass a JSON "
                               "object of MotionAdapter config keys") from exc
    t0 = time.perf_counter()
    components = load_components(base, base_folder=args.base_folder, motion_module=args.motion_module,
                                 motion_config=motion_config, motion_variant=args.motion_variant,
                                 loras=[LoraRequest.parse(text) for text in args.lora],
                                 scheduler_overrides=overrides)
    print(f"loaded {base} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    for check in components.source.get("loras", {}).get("checks", []):
        print(f"  LoRA fusion gate {check['component']}: fused vs unfused max abs {check['max_abs']:.3g} "
              f"(LoRA effect {check['effect_max_abs']:.3g})", file=sys.stderr)
    report = export_bundle(args.out, **components.export_kwargs(), openvino=args.openvino,
                           provenance=components.source, overwrite=args.overwrite, precision=args.precision,
                           release_torch=True, default_timesteps=default_timesteps)
    print(report.summary())
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .backends import create_backend
    from .bundle import load_bundle
    from .default import default_bundle_path

    bundle = load_bundle(default_bundle_path() if args.bundle is None else args.bundle, verify_checksums=True)
    total = sum(entry.size for entry in bundle.files.values())
    m = bundle.model
    sc = bundle.scheduler_config
    print(f"bundle {bundle.root} (format {bundle.format_version}): {len(bundle.files)} files, "
          f"{total / 1e6:.1f} MB, all sha256 verified")
    print(f"  exporter: {bundle.provenance.get('exporter')}, created {bundle.provenance.get('created_utc')}")
    print(f"  video: default {m.default_frames} frames at {m.default_width}x{m.default_height}, {m.default_fps} fps; "
          f"max {m.max_frames} frames; height/width multiple of {m.size_multiple}")
    print(f"  scheduler: LCM, {sc.beta_schedule} betas {sc.beta_start}..{sc.beta_end}, original_inference_steps "
          f"{sc.original_inference_steps}, prediction {sc.prediction_type}, timestep scaling {sc.timestep_scaling}")
    for steps, timesteps in m.default_timesteps.items():
        print(f"  {steps} steps sample at timesteps {', '.join(map(str, timesteps))} (tuned for this model)")
    trained = bundle.provenance.get("source", {}).get("default_model")
    if trained:  # the shipped model: say what it can draw and how it was made
        print(f"  prompts: {trained['prompts']}")
        print(f"  trained here by `{trained['command']}` in {sum(trained['timings_s'].values()) / 60:.0f} min "
              f"(code {trained['code_version']}, seed {trained['seed']})")
        if trained.get("note"):
            print(f"  note: {trained['note']}")
    backend = create_backend("onnxruntime", "cpu")
    for name, component in bundle.components.items():
        session = backend.open(bundle.root, component)
        if [(t.name, t.dtype, len(t.shape)) for t in session.inputs] != \
                [(t.name, t.dtype, len(t.shape)) for t in component.inputs]:
            raise LcmEdgeError(f"{bundle.root / component.onnx}: graph inputs {session.inputs} differ from the "
                               "manifest. Fix: re-export the bundle")
        ins = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in session.inputs)
        outs = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in session.outputs)
        ir = f" + OpenVINO IR {component.openvino}" if component.openvino else ""
        print(f"  {name}: {component.onnx}{ir} ({component.precision}); in: {ins}; out: {outs}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lcm-edge", description="AnimateLCM text-to-video on the edge")
    parser.add_argument("--version", action="version", version=f"lcm-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="make a clip from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--bundle", type=Path, default=None,
                     help="bundle folder written by `lcm-edge export` (default: the tiny model shipped with "
                          "lcm-edge, which knows coloured shapes moving left/right/up/down)")
    gen.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    gen.add_argument("--device", default=None,
                     help="onnxruntime: cpu|cuda|tensorrt|directml|openvino; openvino: CPU|GPU|NPU|AUTO")
    gen.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    gen.add_argument("--cache-dir", type=Path, default=None, help="OpenVINO compile cache folder")
    gen.add_argument("--low-memory", action="store_true",
                     help="onnxruntime: no CPU memory arena (about half the peak RAM, slower steps)")
    gen.add_argument("--frames", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--steps", type=int, default=4)
    gen.add_argument("--guidance-scale", type=float, default=1.0)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--fps", type=int, default=None)
    gen.add_argument("-o", "--output", required=True, help="out.mp4 or out.gif")
    gen.set_defaults(func=cmd_generate)

    exp = sub.add_parser("export", help="export SD1.5 (+ AnimateLCM motion module, LoRAs) to a bundle, offline")
    exp.add_argument("model", type=Path, nargs="?", default=None,
                     help="same as --base DIR (kept for existing scripts)")
    exp.add_argument("--base", type=Path, default=None,
                     help="SD1.5 diffusers folder (or saved AnimateDiff pipeline), or a single-file LDM checkpoint "
                          "(.safetensors/.ckpt)")
    exp.add_argument("--base-folder", type=Path, default=None,
                     help="with a single-file --base: SD1.5 diffusers folder for tokenizer/ (and configs)")
    exp.add_argument("--motion-module", type=Path, default=None,
                     help="AnimateLCM_sd15_t2v.ckpt (original layout) or a diffusers MotionAdapter folder")
    exp.add_argument("--motion-config", type=Path, default=None,
                     help="JSON of MotionAdapter config keys overriding those inferred from the weights")
    exp.add_argument("--motion-variant", default=None, help="MotionAdapter folder weight variant, e.g. fp16")
    exp.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                     help="LoRA to fuse (repeatable), e.g. AnimateLCM_sd15_t2v_lora.safetensors:0.8")
    exp.add_argument("--out", type=Path, required=True)
    exp.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                     help="fp16: UNet and text encoder in fp16 (VAE decoder stays fp32), gated against fp32")
    exp.add_argument("--openvino", action="store_true",
                     help="also write OpenVINO IR (FP32, or FP16-compressed weights with --precision fp16), gated")
    exp.add_argument("--original-inference-steps", type=int, default=None,
                     help="override the LCM schedule's original_inference_steps (AnimateLCM: 100)")
    exp.add_argument("--beta-schedule", default=None, help="override beta_schedule (AnimateLCM: linear)")
    exp.add_argument("--default-timesteps", action="append", default=[], metavar="STEPS=T1,T2,...",
                     help="a schedule tuned for this model (repeatable), e.g. 4=999,699,399,199: `generate --steps "
                          "4` samples at it")
    exp.add_argument("--overwrite", action="store_true")
    exp.set_defaults(func=cmd_export)

    # The distill command's parser is torch-free; training imports happen when it runs.
    from lcm_edge.distill.cli import add_distill_parser

    add_distill_parser(sub)

    info = sub.add_parser("info", help="verify a bundle (files, checksums, graphs) and describe it")
    info.add_argument("bundle", type=Path, nargs="?", default=None, help="bundle folder (default: the shipped one)")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""`lcm-edge` command line: generate, export, info, serve, batch. Argument parsing lives here only."""

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
    from .bundle import load_bundle
    from .default import default_bundle_path
    from .pipeline import AnimateLCMPipeline, check_inputs, create_runtime
    from .video import check_output_path

    output = check_output_path(args.output, "--output")  # before minutes of work, not after
    if args.bundle is None:
        args.bundle = default_bundle_path()
    options = {}
    if args.threads is not None:
        options["threads"] = args.threads
    if args.cache_dir is not None:
        options["cache_dir"] = args.cache_dir
    if args.dynamic_shapes:
        if args.backend != "openvino":
            raise LcmEdgeError("--dynamic-shapes: only the openvino backend compiles per shape. Fix: drop "
                               "--dynamic-shapes, or use --backend openvino")
        options["static_shapes"] = False
    t0 = time.perf_counter()
    bundle = load_bundle(args.bundle)
    generation = dict(num_frames=args.frames, height=args.height, width=args.width, num_inference_steps=args.steps,
                      guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt, seed=args.seed,
                      decoder=args.decoder)
    check_inputs(bundle, args.prompt, **generation)  # before compiling graphs, which can take minutes
    runtime = create_runtime(bundle, args.backend, args.device, precision=args.precision,
                             low_memory=args.low_memory, **options)
    pipe = AnimateLCMPipeline(bundle, runtime, low_memory=args.low_memory)
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


def cmd_check_precision(args: argparse.Namespace) -> int:
    from .default import default_bundle_path
    from .bundle import load_bundle
    from .precision import GATE_SEEDS, check_precision, record_path

    bundle = default_bundle_path() if args.bundle is None else args.bundle
    # A failed gate is recorded too (auto then stays at f32) and ends in a ParityError: exit code 2.
    check = check_precision(bundle, args.precision, backend=args.backend, device=args.device,
                            seeds=tuple(args.seeds or GATE_SEEDS), num_frames=args.frames, height=args.height,
                            width=args.width)
    print(check.summary())
    print(f"recorded in {record_path(load_bundle(bundle, verify_checksums=False))}")
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
    if args.int8 is not None:  # the INT8 arguments are checked before minutes of export
        from lcm_edge.export.calibration import read_prompts

        if args.out.exists() and not args.overwrite:
            raise LcmEdgeError(f"--out: '{args.out}' already exists. Fix: choose a new folder or pass --overwrite")
        if not args.out.parent.is_dir():
            raise LcmEdgeError(f"--out: folder '{args.out.parent}' does not exist. Fix: create it first")
        if args.calibration_prompts is not None:
            try:
                read_prompts(args.calibration_prompts)
            except LcmEdgeError as exc:
                raise LcmEdgeError(f"--calibration-prompts: {exc.problem}. Fix: {exc.fix}") from exc
        if args.samples < 1:
            raise LcmEdgeError(f"--samples: {args.samples} is not positive. Fix: record e.g. 200 UNet inputs")
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
    if args.int8 is None:
        report = export_bundle(args.out, **components.export_kwargs(), openvino=args.openvino,
                               provenance=components.source, overwrite=args.overwrite, precision=args.precision,
                               release_torch=True, default_timesteps=default_timesteps, tiny_decoder=args.tiny_decoder,
                               attention=args.attention)
        print(report.summary())
        return 0
    # --int8: the fp32 bundle is exported beside the target, quantized into it, then removed.
    import shutil
    import tempfile

    fp32 = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.fp32-", dir=args.out.parent)) / "bundle"
    try:
        report = export_bundle(fp32, **components.export_kwargs(), openvino=args.openvino,
                               provenance=components.source, precision=args.precision, release_torch=True,
                               default_timesteps=default_timesteps, tiny_decoder=args.tiny_decoder,
                               attention=args.attention)
        print(report.summary())
        _run_quantize(args, fp32, args.int8_backend, args.int8)
    finally:
        shutil.rmtree(fp32.parent)
    return 0


def _quantize_kwargs(args: argparse.Namespace) -> dict:
    return dict(calibration_prompts=args.calibration_prompts, samples=args.samples, frames=args.frames,
                height=args.height, width=args.width, guidance_scale=args.calibration_guidance,
                gate_clips=args.gate_clips, adherence_prompts=args.adherence_prompts, overwrite=args.overwrite)


def _run_quantize(args: argparse.Namespace, bundle: Path, backend: str, recipe: str) -> None:
    from .errors import InvalidArgumentError

    from lcm_edge.export.quantize import quantize_bundle

    flags = {"bundle": "BUNDLE", "guidance_scale": "--calibration-guidance", "backend": "--backend"}
    try:
        report = quantize_bundle(bundle, args.out, backend=backend, recipe=recipe, **_quantize_kwargs(args),
                                 log=lambda message: print(message, file=sys.stderr, flush=True))
    except InvalidArgumentError as exc:  # name the flag, not the Python argument
        flag = flags.get(exc.argument, "--" + exc.argument.replace("_", "-"))
        raise LcmEdgeError(f"{flag}: {exc.problem}. Fix: {exc.fix}") from exc
    print(report.summary())


def cmd_quantize(args: argparse.Namespace) -> int:
    from .errors import MissingExtraError

    try:
        import lcm_edge.export.quantize  # noqa: F401
    except MissingExtraError as exc:
        raise LcmEdgeError(str(exc)) from exc
    _run_quantize(args, args.bundle, args.backend, args.recipe)
    return 0


def _add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    """INT8 calibration and gate options, shared by `quantize` and `export --int8`."""
    parser.add_argument("--calibration-prompts", type=Path, default=None, metavar="FILE",
                        help="prompts to calibrate on, one a line (default: the shipped default model's list)")
    parser.add_argument("--samples", type=int, default=200, help="UNet inputs recorded from the 4-step loop")
    parser.add_argument("--frames", type=int, default=None, help="calibration frames (default: the bundle's)")
    parser.add_argument("--height", type=int, default=None, help="calibration height (default: the bundle's)")
    parser.add_argument("--width", type=int, default=None, help="calibration width (default: the bundle's)")
    parser.add_argument("--calibration-guidance", type=float, default=None, metavar="SCALE",
                        help="also record guided batches (every other clip) at this CFG scale")
    parser.add_argument("--gate-clips", type=int, default=2,
                        help="clips for the held-out per-step gate and the end-to-end PSNR gate")
    parser.add_argument("--adherence-prompts", type=int, default=None,
                        help="default model only: clips for the adherence gate (default 60; 0 skips it)")


def cmd_quantize_tiny_decoder(args: argparse.Namespace) -> int:
    from .errors import MissingExtraError

    try:
        from lcm_edge.export.tiny_decoder_int8 import quantize_tiny_decoder
    except MissingExtraError as exc:
        raise LcmEdgeError(str(exc)) from exc
    gate = {"min_psnr_db": None} if args.skip_fidelity_check else {}
    print(quantize_tiny_decoder(args.bundle, out=args.out, threads=args.threads,
                                calibration_prompts=args.calibration_prompts, **gate).summary())
    return 0


def cmd_add_tiny_decoder(args: argparse.Namespace) -> int:
    from .errors import MissingExtraError

    try:
        from lcm_edge.export.tiny_decoder import add_tiny_decoder
    except MissingExtraError as exc:
        raise LcmEdgeError(str(exc)) from exc
    if args.skip_fidelity_check and args.min_psnr_db is not None:
        raise LcmEdgeError("--min-psnr-db: given with --skip-fidelity-check. Fix: pass one of them")
    gate = {"min_psnr_db": None} if args.skip_fidelity_check else \
        {} if args.min_psnr_db is None else {"min_psnr_db": args.min_psnr_db}
    report = add_tiny_decoder(args.bundle, args.weights, out=args.out, overwrite=args.overwrite, threads=args.threads,
                              **gate)
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
    tiny = (bundle.provenance.get("tiny_decoder") or {}).get("fidelity")
    if "vae_decoder_tiny" in bundle.components and tiny:
        print(f"  tiny decoder: PSNR {tiny['psnr_db']:.1f} dB against the VAE decoder on {tiny['clips']} sampled clips, "
              f"flicker {tiny['flicker_tiny']:.4f} (VAE decoder {tiny['flicker_full']:.4f}); generate --decoder tiny")
    backend = create_backend("onnxruntime", "cpu")
    for name, component in bundle.components.items():
        session = backend.open(bundle.root, component)
        if [(t.name, t.dtype, len(t.shape)) for t in session.inputs] != \
                [(t.name, t.dtype, len(t.shape)) for t in component.inputs]:
            raise LcmEdgeError(f"{session.path}: graph inputs {session.inputs} differ from the "
                               "manifest. Fix: re-export the bundle")
        ins = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in session.inputs)
        outs = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in session.outputs)
        ir = f" + OpenVINO IR {component.openvino} ({component.graph_precision('openvino')})" \
            if component.openvino else ""
        fused = f" + fused attention {component.onnx_fused}" if component.onnx_fused else ""
        print(f"  {name}: {component.onnx}{fused} ({component.graph_precision('onnx')}){ir}; in: {ins}; out: {outs}")
    int8 = bundle.provenance.get("int8")
    if int8:  # a quantized bundle: how it was calibrated
        c = int8["calibration"]
        print(f"  int8: recipe {int8['recipe']} for {', '.join(int8['backends'])}; calibrated on {c['samples']} UNet "
              f"inputs ({c['frames']}x{c['height']}x{c['width']}, timesteps {c['timesteps']}) from "
              f"{c['prompts_file']} (sha256 {c['prompts_sha256'][:12]}); CPU vnni={int8['cpu']['vnni']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import launch

    launch(host=args.host, port=args.port, bundles=args.bundle, concurrency=args.concurrency,
           precision=args.precision, low_memory=args.low_memory)
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch import run_batch
    from .default import default_bundle_path

    if args.threads is not None and args.backend != "onnxruntime":
        raise LcmEdgeError("--threads: an onnxruntime option. Fix: drop --threads, or use --backend onnxruntime")
    options = {} if args.threads is None else {"threads": args.threads}
    summary = run_batch(args.prompts, args.out, bundle=args.bundle or default_bundle_path(), backend=args.backend,
                        device=args.device, options=options, workers=args.workers, ray_address=args.ray,
                        on_error=args.on_error, extension="." + args.format)
    print(f"batch: {summary.written} written, {summary.skipped_existing} already there, {summary.failed} failed, "
          f"{summary.bad_lines} bad lines; results in {args.out / 'results.jsonl'}")
    return 1 if summary.failed or summary.bad_lines else 0


def _parse_torch_source(items: list[str] | None) -> dict | None:
    if not items:
        return None
    source: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise LcmEdgeError(f"--torch-source: {item!r} is not KEY=VALUE. Fix: write e.g. base=sd15/ "
                               "motion_module=AnimateLCM_sd15_t2v.ckpt lora=lora.safetensors:0.8")
        if key == "lora":
            source.setdefault("loras", []).append(value)
        else:
            source[key] = value
    return source


def cmd_bench(args: argparse.Namespace) -> int:
    import datetime as dt

    from .bench.runner import BenchOptions, run_bench
    from .bench.scenarios import expand_matrix, load_scenario_file

    settings = {"warmup": args.warmup, "runs": args.runs, "seed": args.seed, "prompt": args.prompt,
                "decode_frames": args.decode_frames, "timeout_s": args.timeout,
                "torch_source": _parse_torch_source(args.torch_source)}
    if args.scenarios is not None:
        given = [flag for flag in ("bundle", "runtime", "size", "steps", "guidance") if getattr(args, flag)]
        if given:
            raise LcmEdgeError(f"--scenarios: given with --{', --'.join(given)}. Fix: put the matrix in the file, "
                               "or drop --scenarios")
        scenarios, _ = load_scenario_file(args.scenarios)
        overrides = {k: v for k, v in settings.items() if v is not None}
        if overrides:
            from dataclasses import replace

            scenarios = [replace(s, **overrides) for s in scenarios]
    else:
        scenarios = expand_matrix(bundles=args.bundle or ["default"],
                                  runtimes=args.runtime or ["onnxruntime:cpu", "openvino:CPU"],
                                  sizes=args.size or [None], steps=args.steps or [4], guidance=args.guidance or [1.0],
                                  settings=settings)
    out = args.out or Path("bench-results") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    options = BenchOptions(out=out, reference=args.reference, reference_bundle=args.reference_bundle,
                           memory_limit_gib=args.memory_limit_gib, plots=not args.no_plots,
                           peak_probe=not args.no_peak_probe)
    if args.list:
        from .bench.runner import prepare_scenarios

        for s, reason in prepare_scenarios(scenarios, options):
            print(s.id + (f"  [skipped: {reason}]" if reason else ""))
        return 0
    doc = run_bench(scenarios, options)
    print((out / "results.md").read_text(encoding="utf-8"))
    failed = [r for r in doc["rows"] if r["status"] not in ("ok", "skipped")]
    print(f"results: {out / 'results.json'} ({len(doc['rows'])} rows, {len(failed)} did not finish)")
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
    gen.add_argument("--precision", choices=("auto", "f32", "bf16", "f16"), default="f32",
                     help="compute precision (openvino: bf16 on CPUs with AVX512_BF16/AMX, f16 on GPUs); auto picks "
                          "the fastest one `lcm-edge check-precision` passed on this machine, else f32")
    gen.add_argument("--dynamic-shapes", action="store_true",
                     help="openvino: compile once for any size instead of per call size (static is the default)")
    gen.add_argument("--low-memory", action="store_true",
                     help="load each graph when needed and free it after (text encoder before the UNet, UNet before "
                          "decoding), decode one frame at a time, no onnxruntime memory arena: less RAM, slower")
    gen.add_argument("--frames", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--steps", type=int, default=4)
    gen.add_argument("--guidance-scale", type=float, default=1.0)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--fps", type=int, default=None)
    gen.add_argument("--decoder", choices=("full", "tiny"), default="full",
                     help="tiny: decode with the bundle's tiny decoder (vae_decoder_tiny), much faster, a little "
                          "less exact")
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
    exp.add_argument("--attention", choices=("fused", "plain"), default="fused",
                     help="fused (default): UNet and VAE decoder also as a graph with onnxruntime's memory-efficient "
                          "MultiHeadAttention, which onnxruntime CPU/CUDA/DirectML run; plain: standard ops only")
    exp.add_argument("--tiny-decoder", type=Path, default=None, metavar="PATH",
                     help="TAESD-format decoder weights (diffusers AutoencoderTiny folder, or taesd_decoder"
                          ".safetensors/.pth) to add as vae_decoder_tiny, gated against this VAE's decoder")
    exp.add_argument("--int8", nargs="?", const="hybrid", default=None, choices=("hybrid", "full"), metavar="RECIPE",
                     help="write an INT8 bundle instead (recipe hybrid, the default, or full), calibrated and gated "
                          "as `lcm-edge quantize`")
    exp.add_argument("--int8-backend", choices=("onnxruntime", "openvino", "both"), default="both")
    _add_calibration_arguments(exp)
    exp.set_defaults(func=cmd_export)

    quant = sub.add_parser("quantize", help="INT8 bundle from an fp32 one: calibrated on its own sampling, gated")
    quant.add_argument("bundle", type=Path, help="fp32 bundle folder")
    quant.add_argument("--out", type=Path, required=True, help="folder for the INT8 bundle (must not exist)")
    quant.add_argument("--backend", default="both", help="onnxruntime | openvino | both")
    quant.add_argument("--recipe", default="hybrid",
                       help="hybrid (W8A8 convolutions + weight-only linear layers) or full (W8A8 both)")
    _add_calibration_arguments(quant)
    quant.add_argument("--overwrite", action="store_true")
    quant.set_defaults(func=cmd_quantize)

    # The distill command's parser is torch-free; training imports happen when it runs.
    from lcm_edge.distill.cli import add_distill_parser

    add_distill_parser(sub)

    serve = sub.add_parser("serve", help="local web UI (needs the [app] extra)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--bundle", type=Path, action="append", default=[],
                       help="a bundle folder offered beside the default model (repeatable)")
    serve.add_argument("--concurrency", type=int, default=1,
                       help="generations run at once; the others wait in the queue (default 1)")
    serve.add_argument("--precision", choices=("auto", "f32", "bf16", "f16"), default="f32",
                       help="compute precision of every pipeline the server compiles (as for generate)")
    serve.add_argument("--low-memory", action="store_true",
                       help="open each graph only while a generation needs it (less RAM, slower calls)")
    serve.set_defaults(func=cmd_serve)

    batch = sub.add_parser("batch", help="many clips from a JSON-lines file (resumable; local or Ray)")
    batch.add_argument("prompts", type=Path,
                       help="JSON lines: {\"prompt\": ..., \"seed\", \"frames\", \"height\", \"width\", "
                            "\"steps\", \"guidance\", \"negative_prompt\" optional}")
    batch.add_argument("--out", type=Path, required=True, help="output folder (clips + results.jsonl)")
    batch.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the shipped model)")
    batch.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    batch.add_argument("--device", default=None)
    batch.add_argument("--threads", type=int, default=None, help="onnxruntime threads per worker")
    batch.add_argument("--workers", type=int, default=1, help="worker processes (or Ray actors), one pipeline each")
    batch.add_argument("--ray", default=None, metavar="auto|local|ADDRESS",
                       help="run the workers as Ray actors: auto = the cluster of `ray start`, local = a new one "
                            "on this machine, or a cluster address")
    batch.add_argument("--on-error", choices=("skip", "stop"), default="skip",
                       help="a bad line or failed clip: report and go on (skip), or stop the batch (stop)")
    batch.add_argument("--format", choices=("mp4", "gif"), default="mp4")
    batch.set_defaults(func=cmd_batch)

    tiny = sub.add_parser("add-tiny-decoder", help="add a tiny VAE decoder (TAESD format) to a bundle, gated",
                          description="Export TAESD-format decoder weights as the bundle's vae_decoder_tiny: fit "
                                      "checks, parity gates, and a fidelity gate (PSNR and flicker against the "
                                      "bundle's VAE decoder on clips its own sampler makes). The bundle stays "
                                      "valid if interrupted.")
    tiny.add_argument("bundle", type=Path, help="bundle folder")
    tiny.add_argument("--weights", type=Path, required=True,
                      help="diffusers AutoencoderTiny folder, or taesd_decoder.safetensors/.pth")
    tiny.add_argument("--out", type=Path, default=None, help="write a copy of the bundle here instead of in place")
    tiny.add_argument("--overwrite", action="store_true", help="replace a tiny decoder the bundle already has")
    tiny.add_argument("--min-psnr-db", type=float, default=None,
                      help="fidelity gate threshold (default: TINY_DECODER_MIN_PSNR_DB, 24 dB)")
    tiny.add_argument("--skip-fidelity-check", action="store_true",
                      help="only the fit checks and parity gates (for weights checked another way)")
    tiny.add_argument("--threads", type=int, default=None, help="onnxruntime threads for the fidelity check")
    tiny.set_defaults(func=cmd_add_tiny_decoder)

    qtiny = sub.add_parser("quantize-tiny-decoder", help="give a bundle's tiny decoder INT8 graphs (onnxruntime, "
                           "OpenVINO IR where it has one), gated",
                           description="Quantize the tiny decoder's onnx graph to INT8 (static QDQ, calibrated on the "
                                       "bundle's own latents; 2-3x faster on onnxruntime CPU) and, where it has an "
                                       "OpenVINO IR, the IR too (NNCF, same latents; needs lcm-edge[int8]), each "
                                       "gated on its runtime against the fp32 tiny graph "
                                       "(TINY_DECODER_INT8_MIN_PSNR_DB) and the full decoder (the tiny decoder's "
                                       "fidelity gate).")
    qtiny.add_argument("bundle", type=Path, help="bundle folder with an fp32 vae_decoder_tiny")
    qtiny.add_argument("--out", type=Path, default=None, help="write a copy of the bundle here instead of in place")
    qtiny.add_argument("--calibration-prompts", type=Path, default=None, metavar="FILE",
                       help="prompts to sample latents from, one a line, at least 12 and varied (default: the "
                            "shipped model's colour/shape/direction list); the first 8 calibrate, the next 4 gate")
    qtiny.add_argument("--skip-fidelity-check", action="store_true",
                       help="only the INT8-vs-fp32 gate (for a tiny decoder not made for this bundle's latents)")
    qtiny.add_argument("--threads", type=int, default=None,
                       help="onnxruntime / OpenVINO threads for sampling and the gates")
    qtiny.set_defaults(func=cmd_quantize_tiny_decoder)

    bench = sub.add_parser(
        "bench", help="benchmark runtimes, precisions and devices on bundles (with PyTorch beside them)",
        description="Runs every scenario of a matrix (bundle x runtime x size x steps x guidance), each in its own "
                    "process, and writes results.json/.csv/.md and plots. Runtimes: backend:device[,key=value...], "
                    "backends onnxruntime (cpu|cuda|tensorrt|directml|openvino), openvino (CPU|GPU|NPU|AUTO), "
                    "pytorch / pytorch-compile (cpu|cuda; diffusers on the bundle's source weights, --torch-source). "
                    "Sizes: HEIGHTxWIDTHxFRAMES.")
    bench.add_argument("--bundle", nargs="+", default=None,
                       help="bundle folders ('default': the shipped model; the default)")
    bench.add_argument("--runtime", nargs="+", default=None,
                       help="e.g. onnxruntime:cpu openvino:CPU openvino:CPU,inference_precision=bf16 pytorch:cpu "
                            "(default: onnxruntime:cpu openvino:CPU)")
    bench.add_argument("--size", nargs="+", default=None, help="e.g. 256x256x8 512x512x16 (default: the bundle's)")
    bench.add_argument("--steps", nargs="+", type=int, default=None, help="default 4")
    bench.add_argument("--guidance", nargs="+", type=float, default=None, help="default 1.0")
    bench.add_argument("--scenarios", type=Path, default=None,
                       help="a TOML/JSON file of [settings], [matrix] and [[scenario]] tables instead of the flags")
    bench.add_argument("--warmup", type=int, default=None, help="warm-up runs per scenario (default 2)")
    bench.add_argument("--runs", type=int, default=None, help="timed runs per scenario (default 3)")
    bench.add_argument("--seed", type=int, default=None)
    bench.add_argument("--prompt", default=None)
    bench.add_argument("--decode-frames", type=int, default=None,
                       help="decode only the first N frames (per-frame VAE figures; for 512x512x16 runs)")
    bench.add_argument("--timeout", type=float, default=None, help="seconds per scenario before it is stopped")
    bench.add_argument("--torch-source", nargs="+", default=None, metavar="KEY=VALUE",
                       help="the PyTorch rows' weights, as lcm-edge export reads them: base=PATH [base_folder=PATH] "
                            "[motion_module=PATH] [lora=FILE:WEIGHT ...]")
    bench.add_argument("--reference", choices=("auto", "none"), default="auto",
                       help="auto: add an fp32 onnxruntime:cpu row to each group for the fidelity columns")
    bench.add_argument("--reference-bundle", default=None,
                       help="compare against this (fp32) bundle's onnxruntime rows, e.g. for an INT8 bundle")
    bench.add_argument("--memory-limit-gib", type=float, default=None,
                       help="kill a scenario above this RSS (default: 90%% of RAM) and record it")
    bench.add_argument("--out", type=Path, default=None, help="results folder (default: bench-results/DATE-TIME)")
    bench.add_argument("--no-plots", action="store_true", help="skip the PNG plots (they need lcm-edge[bench])")
    bench.add_argument("--no-peak-probe", action="store_true", help="skip the fp32 matmul peak probe")
    bench.add_argument("--list", action="store_true", help="print the checked scenarios and exit")
    bench.set_defaults(func=cmd_bench)

    prec = sub.add_parser("check-precision", help="fidelity gate: clips at bf16/f16 against f32, recorded for "
                                                  "--precision auto")
    prec.add_argument("bundle", type=Path, nargs="?", default=None, help="bundle folder (default: the shipped one)")
    prec.add_argument("--precision", choices=("bf16", "f16"), required=True)
    prec.add_argument("--backend", choices=BACKENDS, default="openvino")
    prec.add_argument("--device", default=None)
    prec.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 30000 30001")
    prec.add_argument("--frames", type=int, default=None)
    prec.add_argument("--height", type=int, default=None)
    prec.add_argument("--width", type=int, default=None)
    prec.set_defaults(func=cmd_check_precision)

    info = sub.add_parser("info", help="verify a bundle (files, checksums, graphs) and describe it")
    info.add_argument("bundle", type=Path, nargs="?", default=None, help="bundle folder (default: the shipped one)")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""Full-size SD1.5 + AnimateLCM export: the real architecture, random weights, the real file layouts.

What it proves: the user command (`lcm-edge export` with a personalized single-file checkpoint,
AnimateLCM's original-layout motion module and its spatial LoRA at 0.8) exports the full-size
model (1.31 B parameters, UNet > 2 GB) in fp32 and fp16, with OpenVINO IR (FP32 / FP16-compressed
weights), every graph gated against PyTorch at two frame counts, within this machine's memory.

    .venv/bin/python benchmarks/full_size_export.py --work /tmp/lcm_full [--precisions fp32 fp16]
        [--no-openvino] [--generate] [--keep] [--scale 0.4]

--scale shrinks the UNet and motion module's block_out_channels (multiples of 32; 0.4 gives 128, 256, 512, 512:
a motion UNet of 0.86 GB fp32 against 5.25 GB) for a mid-size run of the same flow on a small machine; the base
folder then carries unet/config.json, as a user's folder would. VAE and text encoder stay full size. Each export
step also reports its peak RSS per GB of fp32 UNet weights: a rough guide between sizes only (libraries, text
encoder and VAE are fixed costs, and a UNet under 2 GiB is traced into one inline protobuf, not spilled to files).

Steps, each in its own process so peak RSS (os.wait4) is per step and the parent stays small:
1. prepare: build the models from the packaged SD1.5/AnimateLCM configs with random weights
   and write WORK/inputs: personalized.safetensors (LDM layout, fp16 like most personalized
   checkpoints), AnimateLCM_sd15_t2v.ckpt (original layout, no position encodings, fp32),
   AnimateLCM_sd15_t2v_lora.safetensors (kohya, rank 64, alpha 8, every AnimateLCM target),
   sd15/tokenizer (the real CLIP vocabulary, from benchmarks/data).
2. export, once per precision: `python -m lcm_edge export ...`, timed.
3. optionally generate: 2 frames, 64x64, 2 steps on onnxruntime (and OpenVINO), timed.
Results: WORK/results.json and a table on stdout. Exported weights stay under WORK (never commit them).

Measured (2 EPYC Zen 3 cores shared with other jobs, torch 2.13 CPU, onnxruntime 1.32, OpenVINO 2026.4):
export incl. loading, both with OpenVINO IR: fp32 281-470 s, peak RSS 11.96 GiB, bundle 11.89 GB
(ONNX 5.94 GB); fp16 489-580 s, peak 9.50 GiB, bundle 6.15 GB (ONNX 3.07 GB). UNet max abs vs
torch at 2 and 4 frames: fp32 ORT 1.5e-6, OV 4.1e-6; fp16 ORT 6.4e-3, OV FP16 weights 6.8e-3
(|output| <= 1.16). LoRA fused vs unfused 1.1e-6 (LoRA effect 0.082).
Mid-size, --scale 0.4 --precisions fp32 (motion UNet 0.86 GB), export step with OpenVINO IR: peak RSS 4.84 GiB while
the OpenVINO gate kept one compiled UNet per gate shape (its phase: +4.0x the UNet's weights), 4.27 GiB with one at
a time (+2.0x; the peak is then the UNet's trace).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# AnimateLCM spatial LoRA targets (docs/animatelcm.md).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def scaled_channels(scale: float) -> list[int]:
    """SD1.5's UNet block_out_channels times `scale`, in multiples of 32 (GroupNorm's 32 groups; 8 heads)."""
    return [max(32, round(c * scale / 32) * 32) for c in (320, 640, 1280, 1280)]


def prepare(work: Path, seed: int, scale: float = 1.0) -> dict:
    import torch
    from diffusers import MotionAdapter
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from clip_vocab import write_sd15_tokenizer

    from lcm_edge.export.checkpoints import build_sd_models, to_ldm_state_dict
    from lcm_edge.export.motion_module import to_original_keys
    from lcm_edge.export.sd15_configs import (ANIMATELCM_ADAPTER_CONFIG, SD15_TEXT_ENCODER_CONFIG, SD15_UNET_CONFIG,
                                              SD15_VAE_CONFIG)

    inputs = work / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    channels = scaled_channels(scale)
    unet_config = {**SD15_UNET_CONFIG, "block_out_channels": channels}
    adapter_config = {**ANIMATELCM_ADAPTER_CONFIG, "block_out_channels": channels}
    if scale != 1:  # the exporter reads a non-SD1.5 UNet config from the base folder
        (inputs / "sd15" / "unet").mkdir(parents=True, exist_ok=True)
        (inputs / "sd15" / "unet" / "config.json").write_text(
            json.dumps({"_class_name": "UNet2DConditionModel", **unet_config}, indent=2))
    unet, vae, text_encoder = build_sd_models(unet_config, SD15_VAE_CONFIG, SD15_TEXT_ENCODER_CONFIG,
                                              unet_on_meta=False)
    vae = type(vae).from_config(vae.config)  # built on meta by build_sd_models: make it real
    counts = {"unet": sum(p.numel() for p in unet.parameters()), "vae": sum(p.numel() for p in vae.parameters()),
              "text_encoder": sum(p.numel() for p in text_encoder.parameters())}
    ldm = {k: v.half() for k, v in to_ldm_state_dict(unet, vae, text_encoder).items()}
    save_file(ldm, str(inputs / "personalized.safetensors"))
    del ldm, vae, text_encoder

    # The LoRA is written against the UNet's own module names, as kohya does for SD1.x.
    g = torch.Generator().manual_seed(seed + 1)
    lora = {}
    for name, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or not name.endswith(LORA_TARGETS):
            continue
        w = module.weight
        fan_in = w[0].numel()
        down = torch.randn(64, *w.shape[1:], generator=g) / fan_in ** 0.5
        up = torch.randn(w.shape[0], 64, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.02
        key = "lora_unet_" + name.replace(".", "_")
        lora.update({f"{key}.lora_down.weight": down.half(), f"{key}.lora_up.weight": up.half(),
                     f"{key}.alpha": torch.tensor(8.0)})
    save_file(lora, str(inputs / "AnimateLCM_sd15_t2v_lora.safetensors"))
    lora_layers = len(lora) // 3
    del unet, lora

    adapter = MotionAdapter(**adapter_config)
    with torch.no_grad():
        # diffusers zero-initialises the temporal output projections (identity motion modules);
        # make them act, or the motion path would be invisible to every parity check.
        for param in adapter.parameters():
            if not param.any():
                param.normal_(0.0, 0.02)
    counts["motion_module"] = sum(p.numel() for p in adapter.parameters())
    torch.save(to_original_keys(adapter.state_dict()), inputs / "AnimateLCM_sd15_t2v.ckpt")
    del adapter
    write_sd15_tokenizer(inputs / "sd15" / "tokenizer")
    # A TAESD-size tiny decoder (diffusers AutoencoderTiny defaults, 64 channels), random like the rest:
    # added to each bundle after export, for the benchmark's decode rows (its speed, not its pictures).
    from diffusers import AutoencoderTiny

    AutoencoderTiny().save_pretrained(inputs / "taesd")
    # The motion UNet's fp32 weights: what the export's peak RSS is read against.
    unet_fp32_gb = round((counts["unet"] + counts["motion_module"]) * 4 / 1e9, 3)
    return {"parameters": counts, "unet_block_out_channels": channels, "unet_fp32_gb": unet_fp32_gb,
            "lora_layers": lora_layers,
            "files": {p.name: p.stat().st_size for p in inputs.iterdir() if p.is_file()}}


def run_child(argv: list[str], log: Path) -> dict:
    """Run a command, return wall time, peak RSS (this child only) and exit code."""
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    # ru_maxrss is in KiB on Linux.
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
            "exit_code": os.waitstatus_to_exitcode(status), "log": str(log)}


def export_argv(work: Path, precision: str, openvino: bool) -> list[str]:
    inputs = work / "inputs"
    argv = [sys.executable, "-m", "lcm_edge", "export", "--base", str(inputs / "personalized.safetensors"),
            "--base-folder", str(inputs / "sd15"), "--motion-module", str(inputs / "AnimateLCM_sd15_t2v.ckpt"),
            "--lora", f"{inputs / 'AnimateLCM_sd15_t2v_lora.safetensors'}:0.8",
            "--out", str(work / f"bundle-{precision}"), "--precision", precision]
    return argv + (["--openvino"] if openvino else [])


def summarize_bundle(bundle: Path) -> dict:
    manifest = json.loads((bundle / "bundle.json").read_text())
    sizes: dict[str, int] = {}
    for rel, entry in manifest["files"].items():
        part = rel.split("/")[0]
        kind = "openvino" if "openvino_model" in rel else ("onnx" if "model.onnx" in rel else "other")
        sizes[f"{part}/{kind}" if part in manifest["components"] else "other"] = \
            sizes.get(f"{part}/{kind}" if part in manifest["components"] else "other", 0) + entry["size"]
    parity = {}
    for key, report in manifest["provenance"]["parity"].items():
        # max_rel = max abs diff / max |torch output|: the scale the absolute figure is read against.
        parity[key] = {"tolerance": report["tolerance"]["name"],
                       "cases": {c["case"]: {"max_abs": round(c["max_abs"], 7), "max_rel": round(c["max_rel"], 7)}
                                 for c in report["checks"]}}
    source = manifest["provenance"]["source"]
    return {"precision": {n: c["precision"] for n, c in manifest["components"].items()},
            "sizes_gb": {k: round(v / 1e9, 3) for k, v in sorted(sizes.items())},
            "total_gb": round(sum(e["size"] for e in manifest["files"].values()) / 1e9, 3),
            "parity": parity, "lora_gate": source.get("loras", {}).get("checks")}


GENERATE = """
import sys, time, resource
from lcm_edge import AnimateLCMPipeline, load_bundle
from lcm_edge.backends import create_backend
t = time.perf_counter()
pipe = AnimateLCMPipeline(load_bundle(sys.argv[1], verify_checksums=False), create_backend(sys.argv[2]))
load = time.perf_counter() - t
result = pipe("a red circle moving right", num_frames=2, height=64, width=64, num_inference_steps=2, seed=0)
print(f"RESULT load {load:.1f} s, generate {time.perf_counter() - t - load:.1f} s, frames {result.frames.shape}, "
      f"std {result.frames.std():.1f}")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", nargs="?", default="all", choices=("all", "prepare"))
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "fp16"], choices=("fp32", "fp16"))
    parser.add_argument("--no-openvino", action="store_true")
    parser.add_argument("--generate", action="store_true", help="also run a 2-frame 64x64 generation per bundle")
    parser.add_argument("--keep", action="store_true", help="keep the bundles and inputs (several GB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="UNet/motion channel scale for a mid-size run (e.g. 0.4); 1 is SD1.5")
    args = parser.parse_args()
    if not 0 < args.scale <= 1:
        parser.error(f"--scale: {args.scale} is outside (0, 1]")
    work = args.work.resolve()
    if args.step == "prepare":
        info = prepare(work, args.seed, args.scale)
        info["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        (work / "prepare.json").write_text(json.dumps(info, indent=2))
        return 0

    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    step = run_child([sys.executable, __file__, "prepare", "--work", str(work), "--seed", str(args.seed),
                      "--scale", str(args.scale)], work / "prepare.log")
    if step["exit_code"] != 0:
        print(f"prepare failed, see {step['log']}", file=sys.stderr)
        return 1
    results["prepare"] = {**step, **json.loads((work / "prepare.json").read_text())}
    for precision in args.precisions:
        bundle = work / f"bundle-{precision}"
        if bundle.exists():
            shutil.rmtree(bundle)
        step = run_child(export_argv(work, precision, not args.no_openvino), work / f"export-{precision}.log")
        # Peak RSS per GB of fp32 UNet weights (full size: 5.25 GB; 11.96 GiB peak was 2.45).
        step["peak_rss_gb_per_unet_fp32_gb"] = round(step["peak_rss_gib"] * 2**30 / 1e9
                                                    / results["prepare"]["unet_fp32_gb"], 2)
        results[f"export-{precision}"] = step
        print(f"export {precision}: {step}", flush=True)
        if step["exit_code"] != 0:
            print(f"export {precision} failed, see {step['log']}", file=sys.stderr)
            break
        # Random weights cannot pass the tiny decoder's fidelity gate against the full decoder; its parity
        # gates (graph vs torch) still run.
        step = run_child([sys.executable, "-m", "lcm_edge", "add-tiny-decoder", str(bundle), "--weights",
                          str(work / "inputs" / "taesd"), "--skip-fidelity-check"], work / f"tiny-{precision}.log")
        results[f"tiny-decoder-{precision}"] = step
        if step["exit_code"] != 0:
            print(f"adding the tiny decoder to {bundle} failed, see {step['log']}", file=sys.stderr)
            break
        results[f"export-{precision}"].update(summarize_bundle(bundle))
        if args.generate:
            for backend in ["onnxruntime"] + ([] if args.no_openvino else ["openvino"]):
                gen = run_child([sys.executable, "-c", GENERATE, str(bundle), backend],
                                work / f"generate-{precision}-{backend}.log")
                gen["result"] = [line for line in Path(gen["log"]).read_text().splitlines()
                                 if line.startswith("RESULT")]
                results[f"generate-{precision}-{backend}"] = gen
        if not args.keep:
            shutil.rmtree(bundle)
    if not args.keep:
        shutil.rmtree(work / "inputs", ignore_errors=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

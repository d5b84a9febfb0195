"""Decode time of the tiny decoder against the full VAE decoder, and what it does to a whole generation.

    python benchmarks/decoder_speed.py [--bundle BUNDLE] [--threads 1] [--repeats 5] [--openvino]
    python benchmarks/decoder_speed.py --full-size [--sizes 256x8 512x16] [--threads N] [--openvino]
    python benchmarks/decoder_speed.py --adherence [--bundle BUNDLE]      # the default model's prompt adherence

Default: a bundle that has a vae_decoder_tiny (the shipped default model has one): per-clip decode time of
both decoders at the bundle's default frames and size (median of --repeats, after a warm-up), and the end-to-end
generation time with decoder="full" and decoder="tiny" on the same backend.

--full-size: the real architectures with random weights (decode time does not depend on the weights): SD1.5's
AutoencoderKL decoder and TAESD's decoder (diffusers AutoencoderTiny defaults: 64 channels, blocks 3/3/3/1),
each exported to ONNX by the exporter's own path and timed per clip at 256x256x8 and 512x512x16 frames
(frames decoded 4 at a time, as the pipeline does); also TAESD's INT8 graphs of lcm-edge quantize-tiny-decoder
(export/tiny_decoder_int8.py, calibrated on random latents: speed only): onnxruntime's static QDQ graph and, with
--openvino, NNCF's INT8 IR.
Needs ~6 GiB of RAM at 512x512; the lead runs it.

--adherence: the default model's prompt adherence (all three of colour, shape and direction right, read by
lcm_edge.distill.default_model.detector) over all 60 prompts at seeds ADHERENCE_SEED_BASE + i (never used in
training or tuning), each clip decoded by both decoders from the same latents; the tiny decoder must stay within
TINY_DECODER_ADHERENCE_MARGIN of the full decoder (raises SystemExit 1 otherwise).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ADHERENCE_SEED_BASE = 30_000
# The tiny decoder may lose at most this much adherence against the full decoder on the same latents: 3 of 60 clips.
TINY_DECODER_ADHERENCE_MARGIN = 0.05
DECODE_CHUNK = 4
# SD1.5's VAE (diffusers' runwayml config) and TAESD's decoder (AutoencoderTiny's defaults).
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                scaling_factor=0.18215)
TAESD = dict(decoder_block_out_channels=(64, 64, 64, 64), num_decoder_blocks=(3, 3, 3, 1))


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-run allocations and kernel selection
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bundle_rows(bundle_path: str, threads: int | None, repeats: int, openvino: bool) -> list[dict]:
    import lcm_edge

    backends = [("onnxruntime", "cpu", {"threads": threads} if threads else {})]
    if openvino:
        backends.append(("openvino", "CPU", {"config": {"INFERENCE_NUM_THREADS": threads}} if threads else {}))
    rows = []
    for backend, device, options in backends:
        pipe = lcm_edge.AnimateLCMPipeline.from_bundle(bundle_path, backend=backend, device=device, **options)
        m = pipe.bundle.model
        latents = pipe("a red circle moving right", seed=0).latents
        row = {"backend": pipe.backend.describe(), "frames": m.default_frames,
               "size": f"{m.default_width}x{m.default_height}"}
        for decoder in ("full", "tiny"):
            row[f"decode_{decoder}_s"] = _median_seconds(lambda: pipe.decode(latents, DECODE_CHUNK, decoder=decoder),
                                                          repeats)
            row[f"generate_{decoder}_s"] = _median_seconds(
                lambda: pipe("a red circle moving right", seed=1, decoder=decoder), repeats)
        rows.append(row)
    return rows


def full_size_rows(sizes: list[tuple[int, int]], threads: int | None, repeats: int, openvino: bool,
                   vae_config: dict = SD15_VAE, taesd_config: dict = TAESD) -> list[dict]:
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    from lcm_edge.backends import create_backend
    from lcm_edge.bundle import ComponentInfo
    from lcm_edge.export.onnx_io import export_onnx
    from lcm_edge.export.specs import ShapeCase, sample_inputs, vae_decoder_spec
    from lcm_edge.export.tiny_decoder import TinyDecoderWrapper, decoder_config, tiny_decoder_spec
    from lcm_edge.export.wrappers import VaeDecoderWrapper

    torch.manual_seed(0)
    vae = AutoencoderKL(**vae_config).eval()
    taesd = AutoencoderTiny(encoder_block_out_channels=taesd_config["decoder_block_out_channels"],
                            num_encoder_blocks=taesd_config["num_decoder_blocks"], **taesd_config).eval()
    scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    graphs = {"full": (vae_decoder_spec(4), VaeDecoderWrapper(vae)),
              "tiny": (tiny_decoder_spec(4), TinyDecoderWrapper(taesd.decoder, decoder_config(
                  block_out_channels=taesd_config["decoder_block_out_channels"],
                  num_blocks=taesd_config["num_decoder_blocks"]), vae_config["scaling_factor"]))}
    backends = [create_backend("onnxruntime", "cpu", **({"threads": threads} if threads else {}))]
    if openvino:
        backends.append(create_backend("openvino", "CPU"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        infos = {}
        for name, (spec, module) in graphs.items():
            example = sample_inputs(spec, ShapeCase(1, 1, 8, 8), vocab_size=1, rng=np.random.default_rng(0))
            export_onnx(module, spec, example, root / name / "model.onnx", external_data=False)
            xml = None
            if openvino:
                from lcm_edge.export.openvino_ir import convert_to_openvino

                convert_to_openvino(root / name / "model.onnx", root / name / "openvino_model.xml")
                xml = f"{name}/openvino_model.xml"
            infos[name] = ComponentInfo(name=spec.name, onnx=f"{name}/model.onnx", onnx_data=None, openvino=xml,
                                        config=f"{name}/config.json", inputs=spec.inputs, outputs=spec.outputs,
                                        precision="fp32")
        from lcm_edge.export.tiny_decoder_int8 import quantize_graph

        calibration = [np.random.default_rng(i).standard_normal((1, 4, 2, 32, 32), np.float32) for i in range(2)]
        quantize_graph(root / "tiny" / "model.onnx", root / "tiny" / "model_int8.onnx", calibration,
                       vae_config["scaling_factor"])
        int8_ir = None
        if openvino:
            from lcm_edge.export.tiny_decoder_int8 import quantize_ir

            quantize_ir(root / "tiny" / "openvino_model.xml", root / "tiny" / "openvino_model_int8.xml", calibration,
                        vae_config["scaling_factor"])
            int8_ir = "tiny/openvino_model_int8.xml"
        infos["tiny_int8"] = dataclasses.replace(infos["tiny"], onnx="tiny/model_int8.onnx", openvino=int8_ir)
        del vae, taesd, graphs
        for backend in backends:
            # Each backend runs its own graphs: onnxruntime the onnx ones, OpenVINO the IRs (the INT8 tiny one NNCF's).
            sessions = {name: backend.open(root, info) for name, info in infos.items()}
            for size, frames in sizes:
                latents = np.random.default_rng(0).standard_normal((frames, 4, size // scale, size // scale),
                                                                   np.float32)
                row = {"backend": backend.describe(), "frames": frames, "size": f"{size}x{size}"}
                for name, session in sessions.items():
                    def decode():
                        for i in range(0, frames, DECODE_CHUNK):
                            session.run({"latent_sample": latents[i:i + DECODE_CHUNK]})
                    row[f"decode_{name}_s"] = _median_seconds(decode, repeats)
                rows.append(row)
    return rows


def adherence(bundle_path: str, threads: int | None, prompts: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from default_model_eval import prompt_set, score

    import lcm_edge
    from lcm_edge.distill.synthetic import caption_for

    pipe = lcm_edge.AnimateLCMPipeline.from_bundle(bundle_path, **({"threads": threads} if threads else {}))
    combos = prompt_set(prompts)
    full, tiny = [], []
    for i, combo in enumerate(combos):
        result = pipe(caption_for(*combo), num_inference_steps=4, seed=ADHERENCE_SEED_BASE + i)
        full.append(result.frames)
        tiny.append(pipe.decode(result.latents, DECODE_CHUNK, decoder="tiny"))
    a, b = score(full, combos), score(tiny, combos)
    return {"prompts": len(combos), "seed_base": ADHERENCE_SEED_BASE, "full": a, "tiny": b,
            "margin": TINY_DECODER_ADHERENCE_MARGIN,
            "passed": b["adherence"] >= a["adherence"] - TINY_DECODER_ADHERENCE_MARGIN}


def _table(rows: list[dict]) -> str:
    int8 = any("decode_tiny_int8_s" in r for r in rows)
    lines = ["| backend | frames | size | full decoder s/clip | tiny decoder s/clip | decode speed-up |"
             + (" tiny INT8 s/clip | INT8 decode speed-up |" if int8 else "")
             + (" generate full s | generate tiny s | end-to-end speed-up |" if "generate_full_s" in rows[0] else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if int8 else "")
             + ("---|---|---|" if "generate_full_s" in rows[0] else "")]
    for r in rows:
        line = (f"| {r['backend']} | {r['frames']} | {r['size']} | {r['decode_full_s']:.4f} | {r['decode_tiny_s']:.4f} "
                f"| {r['decode_full_s'] / r['decode_tiny_s']:.1f}x |")
        if int8:
            t = r.get("decode_tiny_int8_s")
            line += f" {t:.4f} | {r['decode_full_s'] / t:.1f}x |" if t else " - | - |"
        if "generate_full_s" in r:
            line += (f" {r['generate_full_s']:.3f} | {r['generate_tiny_s']:.3f} | "
                     f"{r['generate_full_s'] / r['generate_tiny_s']:.2f}x |")
        lines.append(line)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=None, help="bundle with a vae_decoder_tiny (default: the shipped one)")
    parser.add_argument("--full-size", action="store_true", help="SD1.5 VAE vs TAESD decoders, random weights")
    parser.add_argument("--sizes", nargs="+", default=["256x8", "512x16"], metavar="SIZExFRAMES")
    parser.add_argument("--adherence", action="store_true", help="the default model's adherence gate")
    parser.add_argument("--prompts", type=int, default=60)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--openvino", action="store_true", help="also time the OpenVINO backend")
    args = parser.parse_args()
    from lcm_edge.default import default_bundle_path

    bundle = args.bundle or str(default_bundle_path())
    if args.adherence:
        r = adherence(bundle, args.threads, args.prompts)
        print(f"adherence over {r['prompts']} prompts at seeds {r['seed_base']}+: full decoder "
              f"{r['full']['adherence']:.2f} (colour {r['full']['colour']:.2f}, shape {r['full']['shape']:.2f}, "
              f"direction {r['full']['direction']:.2f}), tiny decoder {r['tiny']['adherence']:.2f} (colour "
              f"{r['tiny']['colour']:.2f}, shape {r['tiny']['shape']:.2f}, direction {r['tiny']['direction']:.2f}); "
              f"margin {r['margin']} (TINY_DECODER_ADHERENCE_MARGIN): {'passed' if r['passed'] else 'FAILED'}")
        return 0 if r["passed"] else 1
    if args.full_size:
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]
        rows = full_size_rows(sizes, args.threads, args.repeats, args.openvino)
    else:
        rows = bundle_rows(bundle, args.threads, args.repeats, args.openvino)
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

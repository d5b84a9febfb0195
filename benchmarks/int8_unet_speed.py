"""UNet step time of an INT8 bundle against the fp32 bundle it came from, on one runtime, in one process.

    python benchmarks/int8_unet_speed.py --fp32 lcm_edge/default_bundle --int8 INT8_BUNDLE \
        [--backend onnxruntime|openvino] [--frames 16 --height 64 --width 64] [--repeats 10] [--threads N]
        [--int8-precision bf16]

Both UNets get the same input (a recorded-style latent at t=699 and a real prompt's text embeddings); runs
alternate fp32 / int8 so that load from other processes hits both alike. Prints the median step time of each,
the ratio, the output's cosine to fp32, and each bundle's size for that runtime's graphs. Reads the CPU flags
(INT8 speed depends on VNNI). --int8-precision bf16 (OpenVINO) computes the INT8 graph's float parts in bf16
while the fp32 graph stays f32: the deployed INT8 configuration against the fp32 baseline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from lcm_edge.backends import create_backend
from lcm_edge.bundle import load_bundle
from lcm_edge.export.quantize import cosine_and_rel_error, int8_traits, read_cpu_flags
from lcm_edge.tokenizer import CLIPTokenizer


def graph_bytes(bundle, backend: str) -> int:
    """Bytes of the graph files this runtime reads (ONNX + external data, or OpenVINO IR xml + bin)."""
    total = 0
    for c in bundle.components.values():
        if backend == "openvino" and c.openvino:
            rels = [c.openvino, c.openvino[:-4] + ".bin"]
        else:
            rels = [c.onnx, c.onnx_data]
        total += sum(bundle.files[r].size for r in rels if r)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", type=Path, required=True)
    parser.add_argument("--int8", type=Path, required=True)
    parser.add_argument("--backend", choices=("onnxruntime", "openvino"), default="onnxruntime")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--int8-precision", default=None, help="OpenVINO compute precision of the INT8 graph's "
                        "float parts (bf16 or f16; the fp32 graph stays f32)")
    args = parser.parse_args()
    options = {"threads": args.threads} if args.threads and args.backend == "onnxruntime" else {}
    backend = create_backend(args.backend, None, **options)
    int8_backend = create_backend(args.backend, None, precision=args.int8_precision, **options)
    fp32, int8 = load_bundle(args.fp32), load_bundle(args.int8)
    m = fp32.model
    frames, height, width = args.frames or m.default_frames, args.height or m.default_height, args.width or m.default_width
    sessions = {"fp32": backend.open(fp32.root, fp32.components["unet"]),
                "int8": int8_backend.open(int8.root, int8.components["unet"])}
    text = backend.open(fp32.root, fp32.components["text_encoder"])
    ids = CLIPTokenizer.from_folder(fp32.tokenizer_dir).encode("a red circle moving right").input_ids[None]
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((1, m.latent_channels, frames, height // m.vae_scale_factor,
                                            width // m.vae_scale_factor), dtype=np.float32),
             "timestep": np.array([699.0], np.float32),
             "encoder_hidden_states": text.run({"input_ids": ids.astype(np.int64)})["last_hidden_state"]}
    outputs = {label: s.run(feeds)["out_sample"] for label, s in sessions.items()}  # warm-up (and compile)
    times = {"fp32": [], "int8": []}
    for _ in range(args.repeats):
        for label, session in sessions.items():
            t0 = time.perf_counter()
            session.run(feeds)
            times[label].append(time.perf_counter() - t0)
    cosine, rel = cosine_and_rel_error(outputs["fp32"], outputs["int8"])
    med = {label: statistics.median(t) for label, t in times.items()}
    traits = int8_traits(read_cpu_flags())
    print(f"fp32: {backend.describe()}; int8: {int8_backend.describe()}; CPU flags {' '.join(traits.flags)} (vnni {traits.vnni}); "
          f"UNet {frames}x{height}x{width}, {args.repeats} runs each, alternating")
    print(f"fp32 {med['fp32'] * 1e3:.1f} ms/step | int8 {med['int8'] * 1e3:.1f} ms/step | speed-up "
          f"{med['fp32'] / med['int8']:.2f}x | int8 vs fp32 output cosine {cosine:.5f}, rel error {rel:.4f} | "
          f"graphs fp32 {graph_bytes(fp32, args.backend) / 1e6:.2f} MB, int8 {graph_bytes(int8, args.backend) / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

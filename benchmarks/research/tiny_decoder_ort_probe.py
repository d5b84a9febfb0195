"""What limits onnxruntime on the TAESD-size tiny decoder (issue: 0.99 s per 512x512 frame, only 13x under the
full SD1.5 decoder, where 20x was the target). Findings and figures: README.md in this folder.

    python benchmarks/research/tiny_decoder_ort_probe.py [--size 512] [--rounds 3] [--batch 4]

One process, every variant timed once per round, interleaved with a 4096^2 numpy matmul (the machine's fp32 peak as
it is right now: a shared machine's load moves every figure, the ratios much less), best of --rounds per variant:

    fp32            the graph as export/tiny_decoder.py exports it, onnxruntime defaults (ORT_ENABLE_ALL)
    fp32 extended   ORT_ENABLE_EXTENDED: no NCHWc layout transform
    fp32 1 thread   intra_op_num_threads=1
    fp32 no spin    session.intra_op.allow_spinning=0
    fp32 batch B    B frames per call instead of one
    convtranspose   each nearest-upsample + 3x3 conv pair as one ConvTranspose(4x4, stride 2) (same function:
                    2.25x fewer MACs in those convs, 10% of the whole)
    int8            export/tiny_decoder_int8.py's QDQ recipe (calibrated on random latents: speed only)

Printed per variant: the optimized graph's op counts (com.microsoft.nchwc ops show the layout transform), GFLOP per
frame counted from the graph's conv shapes, s/frame, GFLOP/s and its share of the concurrent matmul peak.
Random TAESD-size weights (decode time does not depend on them); needs ~1.5 GiB at 512x512 with --batch 4.
"""

from __future__ import annotations

import argparse
import collections
import copy
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def peak_gflops(n: int = 4096) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    t0 = time.perf_counter()
    a @ a
    return 2 * n ** 3 / (time.perf_counter() - t0) / 1e9


def graph_gflop(path: Path, size: int, latent_channels: int = 4, scale: int = 8) -> float:
    """Multiply-adds x 2 of every Conv/ConvTranspose at one frame of size x size pixels, from the graph's shapes."""
    import onnx

    model = onnx.load(str(path))
    for dim, value in zip(model.graph.input[0].type.tensor_type.shape.dim, (1, latent_channels, size // scale,
                                                                            size // scale)):
        dim.ClearField("dim_param")
        dim.dim_value = value
    model = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input)}
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    macs = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        w = weights[node.input[1]]
        if node.op_type == "Conv":  # w: (out, in/group, kh, kw)
            macs += int(np.prod(shapes[node.output[0]])) * w[1] * w[2] * w[3]
        else:  # w: (in, out/group, kh, kw): every input pixel scatters a kh x kw patch
            macs += int(np.prod(shapes[node.input[0]])) * w[1] * w[2] * w[3]
    return 2 * macs / 1e9


def upsample_conv_as_convtranspose(decoder):
    """DecoderTiny with each (nearest Upsample x2, 3x3 conv) pair replaced by the equal ConvTranspose(4, 2, 1).

    Output row 2i+a of conv(upsample(x)) reads x rows i + floor((a + d - 1) / 2) for conv tap d; as a transposed
    conv (stride 2, padding 1) that row takes kernel tap t = a + 1 - 2 floor((a + d - 1) / 2) from x row i."""
    import torch
    from torch import nn

    taps = torch.zeros(4, 3)
    for a in (0, 1):
        for d in range(3):
            taps[a + 1 - 2 * ((a + d - 1) // 2), d] += 1
    decoder = copy.deepcopy(decoder)
    layers, out, i = list(decoder.layers), [], 0
    while i < len(layers):
        if isinstance(layers[i], nn.Upsample):
            conv = layers[i + 1]
            kernel = torch.einsum("td,oide,se->oits", taps, conv.weight.data, taps)
            deconv = nn.ConvTranspose2d(conv.in_channels, conv.out_channels, 4, stride=2, padding=1,
                                        bias=conv.bias is not None)
            deconv.weight.data = kernel.transpose(0, 1).contiguous()
            if conv.bias is not None:
                deconv.bias.data = conv.bias.data.clone()
            out.append(deconv)
            i += 2
        else:
            out.append(layers[i])
            i += 1
    decoder.layers = nn.Sequential(*out)
    return decoder


def build_graphs(root: Path, size: int) -> dict[str, Path]:
    import torch
    from diffusers import AutoencoderTiny

    from lcm_edge.export.onnx_io import export_onnx
    from lcm_edge.export.specs import ShapeCase, sample_inputs
    from lcm_edge.export.tiny_decoder import TinyDecoderWrapper, decoder_config, tiny_decoder_spec
    from lcm_edge.export.tiny_decoder_int8 import quantize_graph

    torch.manual_seed(0)
    widths, blocks = (64, 64, 64, 64), (3, 3, 3, 1)  # TAESD
    taesd = AutoencoderTiny(encoder_block_out_channels=widths, num_encoder_blocks=blocks,
                            decoder_block_out_channels=widths, num_decoder_blocks=blocks).eval()
    config, spec = decoder_config(block_out_channels=widths, num_blocks=blocks), tiny_decoder_spec(4)
    example = sample_inputs(spec, ShapeCase(1, 1, 8, 8), vocab_size=1, rng=np.random.default_rng(0))
    paths = {}
    for name, decoder in (("fp32", taesd.decoder), ("convtranspose", upsample_conv_as_convtranspose(taesd.decoder))):
        paths[name] = root / name / "model.onnx"
        export_onnx(TinyDecoderWrapper(decoder, config, 0.18215).eval(), spec, example, paths[name],
                    external_data=False)
    calibration = [np.random.default_rng(i).standard_normal((1, 4, 2, size // 8, size // 8), dtype=np.float32)
                   * np.float32(0.18215 * 5) for i in range(2)]
    paths["int8"] = root / "int8.onnx"
    quantize_graph(paths["fp32"], paths["int8"], calibration, 0.18215)
    return paths


def session(path: Path, optimized: Path, level: str = "all", threads: int = 0, spinning: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[level]
    options.optimized_model_filepath = str(optimized)
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    nodes = onnx.load(str(path)).graph.node
    return dict(collections.Counter(f"{n.domain.split('.')[-1] + ':' if n.domain else ''}{n.op_type}" for n in nodes))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="frames per call of the batching variant")
    args = parser.parse_args()
    import onnxruntime as ort

    from lcm_edge.cpu import cpu_flags

    flags = sorted(f for f in cpu_flags() if f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"))
    print(f"onnxruntime {ort.__version__}, {platform.processor() or platform.machine()}, flags {flags}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        graphs = build_graphs(root, args.size)
        variants = {  # name: (graph, session options, frames per call)
            "fp32": ("fp32", {}, 1), "fp32 extended": ("fp32", {"level": "extended"}, 1),
            "fp32 1 thread": ("fp32", {"threads": 1}, 1), "fp32 no spin": ("fp32", {"spinning": False}, 1),
            f"fp32 batch {args.batch}": ("fp32", {}, args.batch), "convtranspose": ("convtranspose", {}, 1),
            "int8": ("int8", {}, 1)}
        sessions, gflop = {}, {}
        for i, (name, (graph, options, _)) in enumerate(variants.items()):
            optimized = root / f"optimized_{i}.onnx"
            sessions[name] = session(graphs[graph], optimized, **options)
            gflop[name] = graph_gflop(graphs["fp32" if graph == "int8" else graph], args.size)  # the same convs
            print(f"{name}: {gflop[name]:.1f} GFLOP/frame; optimized graph {op_counts(optimized)}")
        latent = args.size // 8
        feeds = {b: np.random.default_rng(0).standard_normal((b, 4, latent, latent), dtype=np.float32)
                 for b in {f for _, _, f in variants.values()}}
        reference = sessions["fp32"].run(None, {"latent_sample": feeds[1]})[0]
        for name, (_, _, frames) in variants.items():  # warm-up, and every variant computes the same images
            out = sessions[name].run(None, {"latent_sample": feeds[frames]})[0][:1]
            print(f"{name}: max |difference| to fp32 {np.abs(out - reference).max():.2g}")
        best, peaks = {name: np.inf for name in variants}, []
        for _ in range(args.rounds):
            peaks.append(peak_gflops())
            for name, (_, _, frames) in variants.items():
                t0 = time.perf_counter()
                sessions[name].run(None, {"latent_sample": feeds[frames]})
                best[name] = min(best[name], (time.perf_counter() - t0) / frames)
        peak = max(peaks)
        print(f"\nnumpy 4096^2 matmul: best {peak:.0f} GFLOP/s (rounds: {[round(p) for p in peaks]})")
        print(f"| variant ({args.size}x{args.size}) | GFLOP/frame | s/frame (best of {args.rounds}) | GFLOP/s "
              f"| of matmul peak | vs fp32 |\n|---|---|---|---|---|---|")
        for name in variants:
            rate = gflop[name] / best[name]
            print(f"| {name} | {gflop[name]:.1f} | {best[name]:.3f} | {rate:.0f} | {rate / peak:.0%} | "
                  f"{best['fp32'] / best[name]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

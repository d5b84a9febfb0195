"""Time and peak memory of one attention on onnxruntime CPU: the exporter's fused MultiHeadAttention node against
the plain MatMul -> Softmax -> MatMul pattern of the same attention (what the graph had before fusion, and what
TensorRT and OpenVINO still get), each in its own process so each peak RSS is its own.

    .venv/bin/python benchmarks/attention_memory.py [--shape 16x8x4096x40] [--kv-len N] [--threads N] [--repeat 3]
        [--torch]
    .venv/bin/python benchmarks/attention_memory.py --bundle DIR --size 512x512x16 [--threads N] [--repeat 1]
    --variants fused torch: run only these (the plain pattern at full size needs > 16 GiB)

--shape BATCHxHEADSxTOKENSxHEAD_DIM: the UNet's largest spatial self-attention at 512x512x16 is 16x8x4096x40
(16 frames, 8 heads, 64x64 latent tokens, head dim 320/8); the default is a small shape that runs in seconds.
--kv-len: key/value length (default TOKENS; 77 for the text cross-attention). --torch adds PyTorch's SDPA.

Both graphs come from lcm_edge.export.attention (single_attention_model, unfuse_attention): the node and the
rewrite the exporter itself writes. Each child reports seconds per run (best of --repeat, after one warm-up run),
its RSS before the first run (inputs and session) and its peak RSS; the parent prints them and the largest
difference between the outputs. The plain pattern's score tensor alone is BATCH*HEADS*TOKENS*KV_LEN*4 bytes.

--bundle DIR --size WIDTHxHEIGHTxFRAMES: the same comparison for one UNet pass (batch 1) of a bundle exported with
fused attention: its model_fused.onnx against its model.onnx, both opened by lcm_edge's onnxruntime CPU backend
(default options, so the arena is on as in a generation), on the same random inputs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS = ("fused", "plain")


def parse_shape(text: str, count: int = 4, option: str = "--shape", example: str = "16x8x4096x40") -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        values = ()
    if len(values) != count or min(values) < 1:
        raise SystemExit(f"{option}: {text!r} is not {count} positive integers joined by x. Fix: e.g. {example}")
    return values


def _rss_gib() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        kib = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    return kib / 2 ** 20


def _inputs(batch: int, heads: int, tokens: int, kv_len: int, head_dim: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    width = heads * head_dim
    return {"query": rng.standard_normal((batch, tokens, width), dtype=np.float32),
            "key": rng.standard_normal((batch, kv_len, width), dtype=np.float32),
            "value": rng.standard_normal((batch, kv_len, width), dtype=np.float32)}


def _unet_runner(bundle_dir: Path, size: tuple[int, int, int], variant: str, threads: int):
    import dataclasses

    from lcm_edge.backends import create_backend
    from lcm_edge.bundle import load_bundle

    bundle = load_bundle(bundle_dir, verify_checksums=False)
    unet = bundle.components["unet"]
    if unet.onnx_fused is None:
        raise SystemExit(f"--bundle: {bundle_dir} has no fused UNet graph. Fix: export it with attention='fused'")
    if variant == "plain":
        unet = dataclasses.replace(unet, onnx_fused=None)  # what TensorRT and OpenVINO get
    session = create_backend("onnxruntime", "cpu", threads=threads or None).open(bundle.root, unet)
    width, height, frames = size
    m = bundle.model
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((1, m.latent_channels, frames, height // m.vae_scale_factor,
                                            width // m.vae_scale_factor), dtype=np.float32),
             "timestep": np.array([999.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((1, m.text_max_length, m.text_hidden_size),
                                                          dtype=np.float32)}
    return lambda: session.run(feeds)["out_sample"]


def run_child(variant: str, shape: tuple[int, int, int, int], kv_len: int, threads: int, repeat: int,
              out: Path, bundle: Path | None = None, size: tuple[int, int, int] | None = None) -> dict:
    batch, heads, tokens, head_dim = shape
    feeds = {} if bundle is not None else _inputs(batch, heads, tokens, kv_len, head_dim)
    if bundle is not None:
        run = _unet_runner(bundle, size, variant, threads)
    elif variant == "torch":
        import torch

        torch.set_num_threads(threads or torch.get_num_threads())
        tensors = [torch.from_numpy(feeds[k]).reshape(batch, -1, heads, head_dim).transpose(1, 2)
                   for k in ("query", "key", "value")]

        def run():
            with torch.no_grad():
                o = torch.nn.functional.scaled_dot_product_attention(*tensors)
            return o.transpose(1, 2).reshape(batch, tokens, heads * head_dim).numpy()
    else:
        import onnxruntime as ort

        from lcm_edge.export.attention import single_attention_model, unfuse_attention

        model = single_attention_model(heads, head_dim)
        if variant == "plain":
            unfuse_attention(model)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(model.SerializeToString(), sess_options=options,
                                       providers=["CPUExecutionProvider"])

        def run():
            return session.run(None, feeds)[0]
    before = _rss_gib()
    result = run()  # warm-up, and the output compared across variants
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    np.save(out / f"{variant}.npy", result)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux
    return {"variant": variant, "seconds": min(times), "rss_before_gib": before, "peak_rss_gib": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="2x8x1024x40", help="BATCHxHEADSxTOKENSxHEAD_DIM (default 2x8x1024x40)")
    parser.add_argument("--kv-len", type=int, default=None, help="key/value length (default TOKENS)")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: the runtime's default)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--torch", action="store_true", help="also time PyTorch's scaled_dot_product_attention")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS + ("torch",), default=None,
                        help="run only these (default: fused plain, and torch with --torch)")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="compare one UNet pass of this bundle's fused and plain graphs instead")
    parser.add_argument("--size", default="256x256x8", help="with --bundle: WIDTHxHEIGHTxFRAMES (default 256x256x8)")
    parser.add_argument("--child", choices=VARIANTS + ("torch",), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = parse_shape(args.shape)
    kv_len = args.kv_len or shape[2]
    if args.repeat < 1 or kv_len < 1:
        raise SystemExit("--repeat and --kv-len: must be at least 1")
    size = parse_shape(args.size, 3, "--size", "512x512x16") if args.bundle is not None else None
    if args.child:
        print(json.dumps(run_child(args.child, shape, kv_len, args.threads, args.repeat, args.out, args.bundle, size)))
        return 0

    batch, heads, tokens, head_dim = shape
    if args.bundle is not None:
        if args.torch:
            raise SystemExit("--torch: not with --bundle (lcm-edge bench has PyTorch rows on the source weights)")
        print(f"one UNet pass of {args.bundle} at {args.size} (width x height x frames), batch 1")
    else:
        score_gib = batch * heads * tokens * kv_len * 4 / 2 ** 30
        print(f"attention {batch} x {heads} heads x {tokens} tokens (kv {kv_len}) x head dim {head_dim}; "
              f"the plain pattern's score tensor: {score_gib:.2f} GiB fp32")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = args.variants or VARIANTS + (("torch",) if args.torch else ())
        if args.bundle is not None and "torch" in variants:
            raise SystemExit("--variants: torch is not a bundle variant (lcm-edge bench has PyTorch rows)")
        for variant in variants:
            cmd = [sys.executable, __file__, "--child", variant, "--shape", args.shape, "--kv-len", str(kv_len),
                   "--threads", str(args.threads), "--repeat", str(args.repeat), "--out", tmp]
            if args.bundle is not None:
                cmd += ["--bundle", str(args.bundle), "--size", args.size]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                # A child killed for memory is a result here, not a reason to stop the others.
                rows.append({"variant": variant, "failed": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"})
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        reference = Path(tmp) / "fused.npy"
        for row in rows:
            path = Path(tmp) / f"{row['variant']}.npy"
            if "failed" not in row and reference.exists() and row["variant"] != "fused":
                row["max_abs_vs_fused"] = float(np.abs(np.load(path) - np.load(reference)).max())
    print(f"{'variant':<8} {'s/run':>8} {'RSS before GiB':>15} {'peak RSS GiB':>13} {'max abs vs fused':>17}")
    for row in rows:
        if "failed" in row:
            print(f"{row['variant']:<8} failed: {row['failed']}")
            continue
        diff = f"{row['max_abs_vs_fused']:.2g}" if "max_abs_vs_fused" in row else "-"
        print(f"{row['variant']:<8} {row['seconds']:>8.3f} {row['rss_before_gib']:>15.2f} {row['peak_rss_gib']:>13.2f} "
              f"{diff:>17}")
    setting = {"bundle": str(args.bundle), "size": args.size} if args.bundle is not None else \
        {"shape": list(shape), "kv_len": kv_len}
    print(json.dumps({**setting, "threads": args.threads, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

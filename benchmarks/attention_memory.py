"""Time and peak memory of one attention on onnxruntime CPU: the exporter's fused MultiHeadAttention node against
the plain MatMul -> Softmax -> MatMul pattern of the same attention (what the graph had before fusion, and what
TensorRT and OpenVINO still get), each in its own process so each peak RSS is its own.

    .venv/bin/python benchmarks/attention_memory.py [--shape 16x8x4096x40] [--kv-len N] [--threads N] [--repeat 3]
        [--torch]

--shape BATCHxHEADSxTOKENSxHEAD_DIM: the UNet's largest spatial self-attention at 512x512x16 is 16x8x4096x40
(16 frames, 8 heads, 64x64 latent tokens, head dim 320/8); the default is a small shape that runs in seconds.
--kv-len: key/value length (default TOKENS; 77 for the text cross-attention). --torch adds PyTorch's SDPA.

Both graphs come from lcm_edge.export.attention (single_attention_model, unfuse_attention): the node and the
rewrite the exporter itself writes. Each child reports seconds per run (best of --repeat, after one warm-up run),
its RSS before the first run (inputs and session) and its peak RSS; the parent prints them and the largest
difference between the outputs. The plain pattern's score tensor alone is BATCH*HEADS*TOKENS*KV_LEN*4 bytes.
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


def parse_shape(text: str) -> tuple[int, int, int, int]:
    try:
        values = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 1:
        raise SystemExit(f"--shape: {text!r} is not BATCHxHEADSxTOKENSxHEAD_DIM. Fix: e.g. 16x8x4096x40")
    return values  # type: ignore[return-value]


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


def run_child(variant: str, shape: tuple[int, int, int, int], kv_len: int, threads: int, repeat: int,
              out: Path) -> dict:
    batch, heads, tokens, head_dim = shape
    feeds = _inputs(batch, heads, tokens, kv_len, head_dim)
    if variant == "torch":
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
    parser.add_argument("--child", choices=VARIANTS + ("torch",), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = parse_shape(args.shape)
    kv_len = args.kv_len or shape[2]
    if args.repeat < 1 or kv_len < 1:
        raise SystemExit("--repeat and --kv-len: must be at least 1")
    if args.child:
        print(json.dumps(run_child(args.child, shape, kv_len, args.threads, args.repeat, args.out)))
        return 0

    batch, heads, tokens, head_dim = shape
    score_gib = batch * heads * tokens * kv_len * 4 / 2 ** 30
    print(f"attention {batch} x {heads} heads x {tokens} tokens (kv {kv_len}) x head dim {head_dim}; "
          f"the plain pattern's score tensor: {score_gib:.2f} GiB fp32")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS + (("torch",) if args.torch else ()):
            cmd = [sys.executable, __file__, "--child", variant, "--shape", args.shape, "--kv-len", str(kv_len),
                   "--threads", str(args.threads), "--repeat", str(args.repeat), "--out", tmp]
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
    print(json.dumps({"shape": list(shape), "kv_len": kv_len, "threads": args.threads, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

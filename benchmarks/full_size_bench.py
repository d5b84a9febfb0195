"""The full-size SD1.5 + AnimateLCM matrix of `lcm-edge bench`, on the bundle `full_size_export.py` writes.

    .venv/bin/python benchmarks/full_size_export.py --work WORK --precisions fp32 --keep   # 5-8 min, 12 GiB
    .venv/bin/python benchmarks/full_size_bench.py --work WORK [--sizes 256x256x8 512x512x16] [--out DIR]

It writes WORK/bench.toml and runs `lcm-edge bench --scenarios WORK/bench.toml`: PyTorch eager (the
reference the speed-ups are read against, on the same source files as the bundle), onnxruntime
(fused attention graph), OpenVINO f32 and bf16 (bf16 only where the CPU has it: otherwise the row
is skipped with the reason), the tiny decoder, and every INT8 bundle found beside the fp32 one
(WORK/bundle-int8-*, from `lcm-edge quantize`, compared with the fp32 bundle's onnxruntime row). At 256x256x8 a row samples a whole 4-step clip;
at 512x512x16 one UNet step and one decoded frame (labelled per-frame VAE figures, with the clip's
estimated total), one timed run after no warm-up. Time: about 35 min for both sizes on 2 cores;
disk: the bundle (12 GB) and the inputs (7 GB) from the export, plus a few MB of results.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

# (size, steps, frames decoded, extra rows) per size: 512x512x16 runs minutes per UNet pass on 2 cores.
SIZES = {"256x256x8": (4, None), "512x512x16": (1, 1)}
# The fp32 bundle's rows: PyTorch eager, each backend as exported, then fewer bits (bf16) and fewer FLOPs (the
# tiny decoder, where the bundle has one: full_size_export.py adds a random-weight TAESD-size decoder).
RUNTIMES = ("pytorch:cpu", "onnxruntime:cpu", "onnxruntime:cpu,decoder=tiny", "openvino:CPU",
            "openvino:CPU,precision=bf16", "openvino:CPU,precision=bf16,decoder=tiny")
# An INT8 bundle's rows (lcm-edge quantize --backend both): each backend, and OpenVINO with everything.
INT8_RUNTIMES = ("onnxruntime:cpu", "openvino:CPU", "openvino:CPU,precision=bf16,decoder=tiny")


def scenario_file(work: Path, sizes: list[str], timeout_s: float) -> str:
    inputs = work / "inputs"
    lines = [
        "[settings]", "warmup = 0", "runs = 1", f"timeout_s = {timeout_s}",
        "torch_source = { " + ", ".join([
            f'base = "{inputs / "personalized.safetensors"}"', f'base_folder = "{inputs / "sd15"}"',
            f'motion_module = "{inputs / "AnimateLCM_sd15_t2v.ckpt"}"',
            f'loras = ["{inputs / "AnimateLCM_sd15_t2v_lora.safetensors"}:0.8"]']) + " }", ""]
    extra = sorted(p for p in work.glob("bundle-int8-*") if (p / "bundle.json").is_file())
    for size in sizes:
        steps, decode = SIZES[size]
        decode_line = [f"decode_frames = {decode}"] if decode else []
        lines += ["[[scenario]]", f'bundle = "{work / "bundle-fp32"}"',
                  "runtime = [" + ", ".join(f'"{r}"' for r in RUNTIMES) + "]",
                  f'size = "{size}"', f"steps = {steps}", *decode_line, ""]
        for bundle in extra:
            lines += ["[[scenario]]", f'bundle = "{bundle}"',
                      "runtime = [" + ", ".join(f'"{r}"' for r in INT8_RUNTIMES) + "]",
                      f'size = "{size}"', f"steps = {steps}", *decode_line, ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="the folder full_size_export.py --keep wrote")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per scenario")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = args.work.resolve()
    toml = work / "bench.toml"
    toml.write_text(scenario_file(work, args.sizes, args.timeout))
    cmd = [sys.executable, "-m", "lcm_edge", "bench", "--scenarios", str(toml), "--out",
           str(args.out or work / "bench"), "--reference-bundle", str(work / "bundle-fp32")]
    print(" ".join(cmd), flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())

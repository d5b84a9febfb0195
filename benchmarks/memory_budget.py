"""Peak RSS of one generation per resolution, with and without low_memory, on any bundle.

    python benchmarks/memory_budget.py [--bundle DIR] [--backend onnxruntime openvino]
        [--sizes 16x64x64 16x96x96 16x128x128] [--steps 4] [--option KEY=VALUE ...] [--json out.json]

Sizes are FRAMESxHEIGHTxWIDTH. Each (backend, size, mode) runs in its own subprocess: load the bundle,
generate one clip (seed 0), exit; its peak RSS is the child's ru_maxrss from os.wait4, so nothing measured
before it counts. low_memory=True loads each graph when needed and frees it after (text encoder before the
UNet, UNet before decoding), decodes one frame at a time, and turns off onnxruntime's memory arena (OpenVINO:
one compiled shape per graph). --option passes backend options (VALUE read as JSON, else text), e.g.
--option static_shapes=false, --option mmap_weights=false, --option cache_dir=/tmp/ov_cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def parse_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def child(bundle: str, backend: str, frames: int, height: int, width: int, steps: int, low_memory: bool,
          options: dict) -> None:
    import lcm_edge

    t0 = time.perf_counter()
    pipe = lcm_edge.AnimateLCMPipeline.from_bundle(bundle, backend=backend, low_memory=low_memory, **options)
    result = pipe("a red circle moving right", num_frames=frames, height=height, width=width,
                  num_inference_steps=steps, seed=0)
    print(json.dumps({"describe": pipe.backend.describe(), "seconds": time.perf_counter() - t0,
                      "frames_shape": list(result.frames.shape)}))


def measure(bundle: str, backend: str, size: str, steps: int, low_memory: bool, options: list[str]) -> dict:
    command = [sys.executable, __file__, "--bundle", bundle, "--child", backend, size, str(steps), str(int(low_memory))]
    if options:
        command += ["--option", *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = process.stdout.read(), process.stderr.read()  # small outputs: no pipe can fill
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait for it again
    if process.returncode != 0:
        raise SystemExit(f"{backend} {size} low_memory={low_memory} failed:\n{err}")
    row = json.loads(out.strip().splitlines()[-1])
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return {"backend": backend, "size": size, "low_memory": low_memory, "peak_rss_mib": usage.ru_maxrss * scale / 2**20,
            **row}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=None, help="default: the shipped bundle")
    parser.add_argument("--backend", nargs="+", default=["onnxruntime", "openvino"])
    parser.add_argument("--sizes", nargs="+", default=["16x64x64", "16x96x96", "16x128x128"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--option", nargs="+", default=[], metavar="KEY=VALUE", help="backend option")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bundle is None:
        from lcm_edge.default import default_bundle_path

        args.bundle = str(default_bundle_path())
    if args.child:
        backend, size, steps, low_memory = args.child
        frames, height, width = (int(v) for v in size.split("x"))
        child(args.bundle, backend, frames, height, width, int(steps), low_memory == "1", parse_options(args.option))
        return 0
    rows = []
    print(f"bundle {args.bundle}, {args.steps} steps, one clip per process, options {parse_options(args.option)}")
    print(f"{'backend':<12} {'FxHxW':>12} {'peak MiB':>9} {'low_memory MiB':>14} {'saved':>6} {'s':>6} {'low s':>6}")
    for backend in args.backend:
        for size in args.sizes:
            normal = measure(args.bundle, backend, size, args.steps, False, args.option)
            low = measure(args.bundle, backend, size, args.steps, True, args.option)
            rows += [normal, low]
            print(f"{backend:<12} {size:>12} {normal['peak_rss_mib']:>9.0f} {low['peak_rss_mib']:>14.0f} "
                  f"{1 - low['peak_rss_mib'] / normal['peak_rss_mib']:>6.0%} {normal['seconds']:>6.1f} "
                  f"{low['seconds']:>6.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where OpenVINO's memory goes for one UNet pass at a static shape: RSS split into anonymous memory (OpenVINO's
own buffers and repacked weights) and file pages (the memory-mapped IR weights), after each stage.

    .venv/bin/python benchmarks/research/openvino_unet_memory.py BUNDLE [--size 512x512x16]
        [--precision f32|bf16] [--mmap true|false] [--runs 1] [--release]

One configuration per process (run it once per setting): read_model -> reshape -> compile_model -> drop the
read graph -> infer. Prints one line per stage: VmRSS, RssAnon, RssFile, and VmHWM (the peak so far).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np


def memory() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0]) / 2**20  # kB -> GiB
    return fields


def report(stage: str, started: float) -> None:
    m = memory()
    print(f"{stage:<22} {time.perf_counter() - started:7.1f} s  RSS {m['VmRSS']:6.2f}  anon {m['RssAnon']:6.2f}  "
          f"file {m['RssFile']:6.2f}  peak {m['VmHWM']:6.2f} GiB", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--size", default="512x512x16", help="HEIGHTxWIDTHxFRAMES")
    parser.add_argument("--precision", default="f32", choices=["f32", "bf16"])
    parser.add_argument("--mmap", default="true", choices=["true", "false"])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--release", action="store_true",
                        help="drop the IR's resident file pages during and after the compile, as the runtime does "
                             "(lcm_edge.backends.openvino_backend.releasing_mapped_weights)")
    args = parser.parse_args()
    import openvino as ov

    height, width, frames = (int(v) for v in args.size.split("x"))
    manifest = json.loads((args.bundle / "bundle.json").read_text())
    unet = manifest["components"]["unet"]
    xml = args.bundle / (unet.get("openvino") or unet["onnx"])
    started = time.perf_counter()
    report("start", started)
    core = ov.Core()
    core.set_property({"ENABLE_MMAP": args.mmap == "true"})
    model = core.read_model(str(xml))
    report("read_model", started)
    shapes = {"sample": [1, 4, frames, height // 8, width // 8], "timestep": [1], "encoder_hidden_states": [1] + next(
        spec["shape"][1:] for spec in unet["inputs"] if spec["name"] == "encoder_hidden_states")}
    model.reshape({port: ov.PartialShape(shapes[port.get_any_name()]) for port in model.inputs})
    report("reshape", started)
    from contextlib import nullcontext

    from lcm_edge.backends.openvino_backend import releasing_mapped_weights

    with releasing_mapped_weights(xml.parent) if args.release else nullcontext():
        compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                                     "INFERENCE_PRECISION_HINT": args.precision})
    report("compile_model", started)
    del model
    gc.collect()
    report("read graph dropped", started)
    request = compiled.create_infer_request()
    rng = np.random.default_rng(0)
    dtypes = {spec["name"]: np.dtype(spec["dtype"]) for spec in unet["inputs"]}
    feeds = {name: (np.full(shape, 999) if name == "timestep" else rng.standard_normal(shape)).astype(dtypes[name])
             for name, shape in shapes.items()}
    for run in range(args.runs):
        request.infer(feeds)
        report(f"infer {run + 1}", started)
    print(f"# {xml} {args.size} precision {args.precision} mmap {args.mmap}; openvino {ov.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

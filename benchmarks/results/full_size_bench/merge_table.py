"""The README's full-size table from the two stored runs (run1_512: the lcm_edge rows at 512x512x16, measured
alone after the test suite finished; run2: PyTorch eager at 512x512x16 measured alone, the best path with
low_memory beside it, and the 256x256x8 matrix). Frames: from the runs' frames folders (WORK/bench*/frames, not
stored: 0.8 MB each), so the fidelity column needs the runs' WORK folder; the rest reads results.json alone.

    python benchmarks/results/full_size_bench/merge_table.py WORK
"""
import json, sys
from pathlib import Path

import numpy as np

from lcm_edge.bench.runner import frame_fidelity

HERE = Path(__file__).resolve().parent
WORK = Path(sys.argv[1])
r1 = json.load(open(HERE / "run1_512/results.json")); r2 = json.load(open(HERE / "run2/results.json"))
peak = r2["machine"]["fp32_peak"]["gflops"]
def med(r, k):
    v = r.get(k); return v["median"] if isinstance(v, dict) else v
rows = [(1, r) for r in r1["rows"] if r["status"] == "ok" and r["scenario"]["runtime"]["backend"] != "pytorch"]
rows += [(2, r) for r in r2["rows"]]
def frames(run, r):
    return np.load(WORK / ("bench" if run == 1 else "bench2") / "frames" / r["frames_file"])
def clip(r):
    s = r["scenario"]
    return med(r, "text_encoder_s") + 4 * med(r, "unet_step_s") + s["frames"] * med(r, "vae_decode_s_per_frame")
out = []
for size in ("512x512x16", "256x256x8"):
    group = [(run, r) for run, r in rows if r["status"] == "ok" and f"{r['scenario']['height']}x{r['scenario']['width']}x{r['scenario']['frames']}" == size]
    ref = next((run, r) for run, r in group if r["scenario"]["runtime"]["label"] == "onnxruntime:cpu")
    torch_row = next(r for run, r in group if r["scenario"]["runtime"]["backend"] == "pytorch")
    ref_frames = frames(*ref)
    for run, r in sorted(group, key=lambda x: -clip(x[1])):
        s = r["scenario"]; label = s["runtime"]["label"]
        f = frame_fidelity(frames(run, r), ref_frames)
        fid = "reference" if r is ref[1] else ("identical" if f["identical"] else f"{f['psnr_db']:.1f} dB / {f['max_abs']}")
        if "decoder=tiny" in label: fid += " (random tiny decoder)"
        unet_pct = 100 * r["flops"]["unet_step"] / med(r, "unet_step_s") / 1e9 / peak
        measured = "" if s["decode_frames"] else f" ({med(r, 'total_s'):.0f} measured)"
        out.append(f"| {size} | {label} | {run} | {med(r, 'load_s'):.0f} | {med(r, 'unet_step_s'):.1f} | {med(r, 'vae_decode_s_per_frame'):.2f} | "
                   f"{clip(r):.0f}{measured} | {r['peak_rss_first_gib']:.1f} / {r['peak_rss_steady_gib']:.1f} | {unet_pct:.0f}% | {fid} | {clip(torch_row) / clip(r):.2f}x |")
print("| size HxWxF | runtime | run | load s | UNet s/step | VAE s/frame | 4-step clip s | peak RSS GiB first / steady | UNet GFLOP/s as % of fp32 peak | frames vs onnxruntime fp32: PSNR / max levels | speed-up vs PyTorch eager |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
print("\n".join(out))

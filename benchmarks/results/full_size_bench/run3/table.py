"""The README's full-size table from run 3 (one `lcm-edge bench` run, every row side by side):

    python benchmarks/results/full_size_bench/run3/table.py benchmarks/results/full_size_bench/run3/results.json

A 512x512x16 row sampled one step and decoded one frame: its 4-step clip is text + 4 x step + 16 x frame.
"""
import json, sys
r = json.load(open(sys.argv[1]))
rows = r["rows"]
def clip(row):
    s = row["scenario"]
    if s.get("decode_frames"):
        return row["text_encoder_s"]["median"] + 4 * row["unet_step_s"]["median"] + s["frames"] * row["vae_decode_s_per_frame"]["median"]
    return row["total_s"]["median"]
pt = {}
for row in rows:
    if row["status"] == "ok" and row["scenario"]["runtime"]["backend"] == "pytorch":
        pt[(row["scenario"]["height"], row["scenario"]["frames"])] = clip(row)
print("| size HxWxF | bundle | runtime | load s | UNet s/step | VAE s/frame | 4-step clip s | peak RSS GiB first / steady | frames vs onnxruntime fp32: PSNR / max | speed-up vs PyTorch eager (clip) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for row in rows:
    s = row["scenario"]
    size = f'{s["height"]}x{s["width"]}x{s["frames"]}'
    if row["status"] != "ok":
        print(f'| {size} | {s["bundle"].split("/")[-1]} | {s["runtime"]["label"]} | {row["status"]} |'); continue
    c = clip(row)
    measured = "" if s.get("decode_frames") else ""
    f = row.get("fidelity")
    fid = "-" if not f else ("reference" if f.get("reference") == row["id"] else ("identical" if f.get("identical") else f'{f["psnr_db"]:.1f} dB / {f["max_abs"]}'))
    base = pt.get((s["height"], s["frames"]))
    sp = f'{base / c:.2f}x' if base else "-"
    print(f'| {size} | {s["bundle"].split("/")[-1]} | {s["runtime"]["label"]} | {row["load_s"]:.1f} | {row["unet_step_s"]["median"]:.1f} | '
          f'{row["vae_decode_s_per_frame"]["median"] if s.get("decode_frames") else row["vae_decode_s"]["median"] / s["frames"]:.2f} | {c:.0f} | '
          f'{row["peak_rss_first_gib"]:.1f} / {row["peak_rss_steady_gib"]:.1f} | {fid} | {sp} |')

"""Run 4's table: the tiny decoder against the full one on the same backend, side by side in one `lcm-edge bench`
run (issue 25's decode and end-to-end targets):

    python benchmarks/results/full_size_bench/run4/table.py benchmarks/results/full_size_bench/run4/results.json

Rows pair up by (bundle, size, runtime without decoder=tiny). A 512x512x16 row sampled one step and decoded one
frame: its 4-step clip is text + 4 x step + 16 x frame; a 256x256x8 row ran the whole clip.
"""
import json
import sys


def clip_s(row):
    s = row["scenario"]
    if s.get("decode_frames"):
        return (row["text_encoder_s"]["median"]
                + 4 * row["unet_step_s"]["median"] + s["frames"] * row["vae_decode_s_per_frame"]["median"])
    return row["total_s"]["median"]


def per_frame(row):
    s = row["scenario"]
    return row["vae_decode_s_per_frame"]["median"] if s.get("decode_frames") else row["vae_decode_s"]["median"] / s["frames"]


rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r["status"] == "ok"]
pairs = {}
for row in rows:
    s = row["scenario"]
    label = s["runtime"]["label"]
    tiny = "decoder=tiny" in label
    key = (s["bundle"].split("/")[-1], f'{s["height"]}x{s["width"]}x{s["frames"]}',
           ",".join(p for p in label.split(",") if p != "decoder=tiny"))
    pairs.setdefault(key, {})["tiny" if tiny else "full"] = row
print("| size HxWxF | bundle | runtime | UNet s/step | VAE s/frame full -> tiny | decode speed-up | 4-step clip s full -> tiny "
      "| end to end | full decode share of the clip | peak RSS GiB full / tiny |")
print("|---|---|---|---|---|---|---|---|---|---|")
for (bundle, size, runtime), p in pairs.items():
    full, tiny = p["full"], p["tiny"]
    f_frame, t_frame = per_frame(full), per_frame(tiny)
    f_clip, t_clip = clip_s(full), clip_s(tiny)
    frames = full["scenario"]["frames"]
    print(f"| {size} | {bundle} | {runtime} | {full['unet_step_s']['median']:.1f} | {f_frame:.2f} -> {t_frame:.3f} | "
          f"{f_frame / t_frame:.1f}x | {f_clip:.0f} -> {t_clip:.0f} | {f_clip / t_clip:.2f}x | "
          f"{frames * f_frame / f_clip:.0%} | {full['peak_rss_steady_gib']:.1f} / {tiny['peak_rss_steady_gib']:.1f} |")

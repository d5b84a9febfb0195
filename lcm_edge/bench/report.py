"""Step 7 of `lcm-edge bench`: the results document as CSV, a markdown table and PNG plots."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path


def _median(row: dict, key: str):
    value = row.get(key)
    return value.get("median") if isinstance(value, dict) else value


def _p90(row: dict, key: str):
    value = row.get(key)
    return value.get("p90") if isinstance(value, dict) else None


# (column title, how to read it off a row). Seconds are medians over the timed runs unless said.
COLUMNS = (
    ("bundle", lambda r: Path(r["scenario"]["bundle"]).name),
    ("unet precision", lambda r: r.get("bundle_precision")),
    ("runtime", lambda r: r["scenario"]["runtime"]["label"]),
    ("size HxWxF", lambda r: f"{r['scenario']['height']}x{r['scenario']['width']}x{r['scenario']['frames']}"),
    ("steps", lambda r: r["scenario"]["steps"]),
    ("guidance", lambda r: r["scenario"]["guidance"]),
    ("status", lambda r: r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"),
    ("load s", lambda r: r.get("load_s")),
    ("first run s", lambda r: r.get("first_run_s")),
    ("text encoder s", lambda r: _median(r, "text_encoder_s")),
    ("UNet step s", lambda r: _median(r, "unet_step_s")),
    ("UNet step p90 s", lambda r: _p90(r, "unet_step_s")),
    ("VAE decode s", lambda r: _median(r, "vae_decode_s")),
    ("decoded frames", lambda r: r["scenario"]["decode_frames"] or r["scenario"]["frames"]),
    ("VAE s/frame", lambda r: _median(r, "vae_decode_s_per_frame")),
    ("total s", lambda r: _median(r, "total_s")),
    ("total p90 s", lambda r: _p90(r, "total_s")),
    ("total s, all frames decoded (est.)", lambda r: r.get("total_s_all_frames_estimated")),
    ("peak RSS first GiB", lambda r: r.get("peak_rss_first_gib")),
    ("peak RSS steady GiB", lambda r: r.get("peak_rss_steady_gib")),
    ("UNet GFLOP/s", lambda r: r.get("unet_gflops")),
    ("UNet % of fp32 peak", lambda r: 100 * r["unet_fraction_of_peak"] if r.get("unet_fraction_of_peak") else None),
    ("VAE GFLOP/s", lambda r: r.get("vae_gflops")),
    ("VAE % of fp32 peak", lambda r: 100 * r["vae_fraction_of_peak"] if r.get("vae_fraction_of_peak") else None),
    ("PSNR vs ref dB", lambda r: _psnr(r)),
    ("max abs vs ref", lambda r: (r.get("fidelity") or {}).get("max_abs")),
    ("speed-up vs PyTorch eager", lambda r: r.get("speedup_vs_pytorch_eager")),
)


# The markdown table keeps the columns a reader compares; results.csv has every column.
MARKDOWN_COLUMNS = ("bundle", "unet precision", "runtime", "size HxWxF", "steps", "status", "load s", "first run s",
                    "text encoder s", "UNet step s", "VAE s/frame", "total s", "total s, all frames decoded (est.)",
                    "peak RSS first GiB", "peak RSS steady GiB", "UNet % of fp32 peak", "VAE % of fp32 peak",
                    "PSNR vs ref dB", "max abs vs ref", "speed-up vs PyTorch eager")


def _psnr(row: dict):
    fidelity = row.get("fidelity")
    if not fidelity:
        return None
    return "identical" if fidelity.get("identical") else fidelity.get("psnr_db")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value).replace("|", "/")


def table_rows(doc: dict, titles: tuple[str, ...] | None = None) -> list[list[str]]:
    readers = [(t, read) for t, read in COLUMNS if titles is None or t in titles]
    rows = []
    for row in doc["rows"]:
        bundle = doc["bundles"].get(row["scenario"]["bundle"], {})
        row = {**row, "bundle_precision": bundle.get("precision", {}).get("unet")}
        rows.append([_cell(read(row)) for _, read in readers])
    return rows


def markdown(doc: dict) -> str:
    m = doc["machine"]
    peak = (m.get("fp32_peak") or {})
    lines = [
        f"lcm-edge bench, {doc['created_utc']}: `{doc['command']}`",
        "",
        f"Machine: {m['cpu']['model']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; CPU flags "
        f"{', '.join(m['cpu']['flags'])}; fp32 peak {peak.get('gflops', '-')} GFLOP/s ({peak.get('method', 'not measured')});"
        f" load average at start {m.get('load_average_at_start')}; commit {m.get('commit')}; "
        + ", ".join(f"{k} {v}" for k, v in m["libraries"].items()) + ".",
        "",
        "Seconds are medians over the timed runs (after the warm-ups); fidelity is against each group's fp32 "
        "onnxruntime row with the same latents and noise; FLOPs " + doc["flops_method"] + ".",
        "",
        "| " + " | ".join(MARKDOWN_COLUMNS) + " |",
        "|" + "---|" * len(MARKDOWN_COLUMNS),
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(doc, MARKDOWN_COLUMNS)]
    return "\n".join(lines) + "\n"


def write_reports(doc: dict, out: Path, *, plots: bool = True) -> list[Path]:
    written = []
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([title for title, _ in COLUMNS])
    writer.writerows(table_rows(doc))
    for name, text in (("results.csv", buffer.getvalue()), ("results.md", markdown(doc))):
        path = out / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        written.append(path)
    if plots:
        written += write_plots(doc, out / "plots")
    return written


def write_plots(doc: dict, folder: Path) -> list[Path]:
    """Latency per stage stacked by scenario, speed-up vs PyTorch eager, peak RSS."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    ok = [r for r in doc["rows"] if r.get("status") == "ok"]
    labels = [f"{r['scenario']['runtime']['label']}\n{r['scenario']['height']}x{r['scenario']['width']}x"
              f"{r['scenario']['frames']} {Path(r['scenario']['bundle']).name}" for r in ok]
    written = []

    def save(fig, name: str) -> None:
        path = folder / name
        fig.tight_layout()
        fig.savefig(path.with_suffix(".tmp.png"), dpi=110)
        plt.close(fig)
        os.replace(path.with_suffix(".tmp.png"), path)
        written.append(path)

    height = max(3.0, 0.55 * len(ok) + 1.5)
    fig, ax = plt.subplots(figsize=(10, height))
    left = [0.0] * len(ok)
    for key, name in (("text_encoder_s", "text encoder"), ("unet_total_s", "UNet (all steps)"),
                      ("vae_decode_s", "VAE decode")):
        values = [_median(r, key) or 0.0 for r in ok]
        ax.barh(labels, values, left=left, label=name)
        left = [a + b for a, b in zip(left, values)]
    ax.set_xlabel("seconds per clip (median)")
    ax.set_title("Latency per stage")
    ax.invert_yaxis()
    ax.legend()
    save(fig, "latency_by_stage.png")

    fig, ax = plt.subplots(figsize=(10, height))
    ax.barh(labels, [r.get("speedup_vs_pytorch_eager") or 0.0 for r in ok], color="tab:green")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speed-up of the whole clip vs PyTorch eager (same group; 0 = no PyTorch row)")
    ax.set_title("Speed-up vs PyTorch eager")
    ax.invert_yaxis()
    save(fig, "speedup_vs_pytorch.png")

    fig, ax = plt.subplots(figsize=(10, height))
    ax.barh(labels, [r.get("peak_rss_first_gib") or 0.0 for r in ok], label="first run", alpha=0.6)
    ax.barh(labels, [r.get("peak_rss_steady_gib") or 0.0 for r in ok], label="steady state", alpha=0.9, height=0.4)
    ax.set_xlabel("peak RSS, GiB")
    ax.set_title("Peak memory")
    ax.invert_yaxis()
    ax.legend()
    save(fig, "peak_rss.png")
    return written

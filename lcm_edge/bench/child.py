"""One scenario in its own process, so that its peak RSS is its own: `python -m lcm_edge.bench.child SPEC OUT`.

Recipe: 1. load (compile) the pipeline, timed; 2. the first run, timed apart (lazy compilation,
first-touch allocations); 3. W warm-up runs; 4. N timed runs; 5. write the figures and the last
run's frames. Peak RSS is read for the first run and, after a reset of the kernel's high-water
mark, for the steady state (warm-ups and timed runs).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .scenarios import Scenario

_STATUS = Path("/proc/self/status")


def _status_kib(key: str) -> int | None:
    if not _STATUS.is_file():
        return None
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def rss_gib() -> float | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 2**20


def peak_rss_gib() -> float:
    kib = _status_kib("VmHWM")
    if kib is None:  # not Linux: the process's lifetime peak (cannot be reset)
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
    return kib / 2**20


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so the steady state's peak is read alone."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _progress(scenario: Scenario, message: str) -> None:
    print(f"    {message}", file=sys.stderr, flush=True)


def split_options(options: dict) -> tuple[dict, dict]:
    """A runtime's options -> (AnimateLCMPipeline.from_bundle / backend kwargs, __call__ kwargs such as decoder)."""
    import inspect

    from ..pipeline import AnimateLCMPipeline

    call_names = set(inspect.signature(AnimateLCMPipeline.__call__).parameters) - {"self", "prompt"}
    call = {k: v for k, v in options.items() if k in call_names}
    return {k: v for k, v in options.items() if k not in call}, call


def _lcm_edge_runner(s: Scenario):
    from ..pipeline import AnimateLCMPipeline

    load_options, call_options = split_options(dict(s.runtime.options))
    t0 = time.perf_counter()
    pipe = AnimateLCMPipeline.from_bundle(s.bundle, backend=s.runtime.backend, device=s.runtime.device,
                                          verify_checksums=False, **load_options)
    load_s = time.perf_counter() - t0
    partial = s.decoded_frames < s.frames

    def run() -> tuple[dict, np.ndarray]:
        kwargs = dict(num_frames=s.frames, height=s.height, width=s.width, num_inference_steps=s.steps,
                      guidance_scale=s.guidance, seed=s.seed, **call_options)
        result = pipe(s.prompt, **kwargs, output_type="latents" if partial else "frames")
        timings = result.timings
        frames, vae_s, total_s = result.frames, timings.vae_decode_s, timings.total_s
        if partial:  # decode only the first frames: labelled per-frame VAE figures
            t = time.perf_counter()
            frames = pipe.decode(np.ascontiguousarray(result.latents[:, :, :s.decoded_frames]),
                                 decoder=call_options.get("decoder", "full"))
            vae_s = time.perf_counter() - t
            total_s += vae_s
        return {"text_encoder_s": timings.text_encoder_s, "unet_steps_s": list(timings.unet_steps_s),
                "vae_decode_s": vae_s, "total_s": total_s}, frames

    return pipe.backend.describe(), load_s, run


def run_scenario(s: Scenario, frames_path: Path | None) -> dict:
    if s.runtime.is_torch:
        from lcm_edge.export.reference import reference_runner

        describe, load_s, run = reference_runner(s)
    else:
        describe, load_s, run = _lcm_edge_runner(s)
    figures = {"describe": describe, "load_s": load_s, "rss_after_load_gib": rss_gib()}
    _progress(s, f"loaded in {load_s:.1f} s ({describe}); first run")
    first, frames = run()
    figures.update(first_run=first, peak_rss_first_gib=peak_rss_gib())
    figures["peak_rss_reset"] = reset_peak_rss()
    for i in range(s.warmup):
        _progress(s, f"warm-up {i + 1}/{s.warmup}")
        run()
    runs = []
    for i in range(s.runs):
        timing, frames = run()
        runs.append(timing)
        _progress(s, f"run {i + 1}/{s.runs}: total {timing['total_s']:.2f} s")
    figures.update(runs=runs, peak_rss_steady_gib=peak_rss_gib() if figures["peak_rss_reset"] else None)
    if frames_path is not None:
        np.save(frames_path, frames)
        figures["frames_file"] = frames_path.name
        figures["frames_shape"] = list(frames.shape)
    return figures


def main(argv: list[str]) -> int:
    spec_path, out_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    scenario = Scenario.from_dict(spec["scenario"])
    frames_path = Path(spec["frames_path"]) if spec.get("frames_path") else None
    figures = run_scenario(scenario, frames_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(figures, indent=1))
    os.replace(tmp, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

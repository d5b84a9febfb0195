"""What each caption word is worth to a perfect denoiser, per timestep, under two noise schedules.

    python benchmarks/research/default_model_ideal_gain.py TEACHER_DIR [--reference 600] [--test 64] [--threads 1]

The Bayes-optimal x_0 estimate from a noisy clip x_t is the posterior mean over the data. For one word
(direction, shape or colour; the other two fixed at red / circle / right), compare it over clips of the true
caption (the word known) and over clips of every value of that word pooled (the word unknown); each set drawn
fresh, `reference` clips per caption, encoded with TEACHER_DIR/vae as the chain encodes. Printed per t: how
surely the noisy clip alone tells the word's value (posterior probability of the true value; 1: the word adds
nothing), the word's worth (x_0 error without it / with it - 1) and the epsilon loss it removes; then that
loss over t >= 850 per unit of t = 0..999 (uniform, as the teachers train). For AnimateLCM's schedule (the
chain's) and the same betas rescaled to zero terminal SNR. No model is trained: this bounds what any amount
of training can get from a word. With few references the posterior collapses to the nearest clip at low noise
(both errors sit at that floor there), so the high-noise band is what it reads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lcm_edge.distill.consistency import make_alphas_cumprod
from lcm_edge.distill.default_model.clips import clip_frames
from lcm_edge.distill.default_model.pretrain import ToyArchitecture
from lcm_edge.distill.synthetic import COLOURS, DIRECTIONS, SHAPES, make_clip

SHOWN = (500, 700, 850, 900, 950, 980, 999)
# Every t is evaluated (the noise draws follow this grid); the loss figure integrates t >= HIGH of it.
TIMESTEPS = tuple(sorted(set(range(0, 1000, 25)) | set(SHOWN)))
BASE = {"colour": "red", "shape": "circle", "direction": "right"}
HIGH = 850
VALUES = {"direction": tuple(DIRECTIONS), "shape": SHAPES, "colour": tuple(COLOURS)}


def caption(word: str, value: str) -> tuple[str, str, str]:
    """(colour, shape, direction): BASE with `word` set to `value`."""
    return tuple({**BASE, word: value}[k] for k in ("colour", "shape", "direction"))


def encoded_clips(vae, count: int, colour: str, shape: str, direction: str, arch: ToyArchitecture,
                  rng: np.random.Generator) -> np.ndarray:
    """(count, C*F*h*w) float64 latents of fresh clips, in the chain's latent scale (vae's scaling_factor)."""
    out = []
    for start in range(0, count, 64):
        clips = [make_clip(colour, shape, direction, size=arch.resolution, num_frames=arch.num_frames, rng=rng)
                 for _ in range(min(64, count - start))]
        with torch.no_grad():
            frames = clip_frames(np.stack([c.frames for c in clips]))
            means = vae.encode(frames.flatten(0, 1)).latent_dist.mean * vae.config.scaling_factor
        latents = means.unflatten(0, frames.shape[:2]).permute(0, 2, 1, 3, 4)
        out.append(latents.flatten(1).double().numpy())
    return np.concatenate(out)


def posterior(x_t: np.ndarray, reference: np.ndarray, ref_sq: np.ndarray, a: float,
              s2: float) -> tuple[np.ndarray, np.ndarray]:
    """E[x_0 | x_t] over equally likely `reference` clips (x_t = a x_0 + sqrt(s2) noise), and the weights."""
    logits = (a * x_t @ reference.T - 0.5 * a * a * ref_sq[None]) / s2
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(axis=1, keepdims=True)
    return w @ reference, w


def main(argv: list[str] | None = None) -> int:
    from diffusers import AutoencoderKL

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", type=Path, help="a chain WORKDIR/teacher (its vae is used)")
    parser.add_argument("--reference", type=int, default=600, help="reference clips per caption")
    parser.add_argument("--test", type=int, default=64, help="test clips per caption")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    arch = ToyArchitecture()
    vae = AutoencoderKL.from_pretrained(args.teacher / "vae").eval()
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    captions = sorted({caption(word, v) for word, values in VALUES.items() for v in values})
    reference = {c: encoded_clips(vae, args.reference, *c, arch, rng) for c in captions}
    test = {c: encoded_clips(vae, args.test, *c, arch, rng) for c in captions}
    ref_sq = {c: (r * r).sum(1) for c, r in reference.items()}
    print(f"{len(captions) * (args.reference + args.test)} clips encoded in {time.perf_counter() - t0:.0f} s",
          flush=True)
    noise_rng = np.random.default_rng(args.seed + 1)

    rows = []
    for zero_snr in (False, True):
        acp = make_alphas_cumprod("linear", arch.beta_start, arch.beta_end, 1000, zero_snr).double().numpy()
        schedule = "zero-SNR" if zero_snr else "AnimateLCM"
        for word, values in VALUES.items():
            group = [caption(word, v) for v in values]
            pooled = np.concatenate([reference[c] for c in group])
            pooled_sq = (pooled * pooled).sum(1)
            saved = []
            for t in TIMESTEPS:
                a, s2 = float(np.sqrt(acp[t])), float(1 - acp[t])
                err_word, err_none, p_true = 0.0, 0.0, 0.0
                for i, c in enumerate(group):
                    x0 = test[c]
                    x_t = a * x0 + np.sqrt(s2) * noise_rng.standard_normal(x0.shape)
                    err_word += float(((posterior(x_t, reference[c], ref_sq[c], a, s2)[0] - x0) ** 2).mean())
                    mean_none, w = posterior(x_t, pooled, pooled_sq, a, s2)
                    err_none += float(((mean_none - x0) ** 2).mean())
                    p_true += float(w[:, i * args.reference:(i + 1) * args.reference].sum(1).mean())
                # epsilon error = x_0 error * a^2 / s2: what the teachers' loss sees of it
                saved.append((err_none - err_word) / len(group) * a * a / s2)
                if t in SHOWN:
                    row = {"schedule": schedule, "word": word, "t": t, "snr": a * a / s2,
                           "p_true": p_true / len(group), "x0_error_word": err_word / len(group),
                           "x0_error_none": err_none / len(group),
                           "worth": err_none / err_word - 1, "eps_loss_saved": saved[-1]}
                    rows.append(row)
                    print(f"{schedule:10s} {word:9s} t={t:4d} snr={row['snr']:.1e} P(true value | x_t) "
                          f"{row['p_true']:.2f} (chance {1 / len(group):.2f}); x0 error with the word "
                          f"{row['x0_error_word']:.4f}, without {row['x0_error_none']:.4f}: worth {row['worth']:+.3f}, "
                          f"eps loss saved {row['eps_loss_saved']:.1e}", flush=True)
            # Over t >= HIGH only: below, the finite reference sets' nearest-clip floor, not the word, sets both errors.
            band = [i for i, t in enumerate(TIMESTEPS) if t >= HIGH]
            mean_saved = float(np.trapezoid([saved[i] for i in band], [TIMESTEPS[i] for i in band]) / 1000)
            rows.append({"schedule": schedule, "word": word, "eps_loss_saved_per_t": mean_saved})
            print(f"{schedule:10s} {word:9s} eps loss saved at t >= {HIGH}, per unit of t = 0..999: {mean_saved:.2e}",
                  flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

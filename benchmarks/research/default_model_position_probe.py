"""What keeps the default model's UNet from making the direction word's track out of pure noise?

    python benchmarks/research/default_model_position_probe.py WORKDIR [--mean-targets] [--fresh-text-encoder]
        [--coords] [--frame-index] [--blank-input] [--mid-block] [--unet-channels 32,64,64] [--stf-targets]
        [--min-timestep 990] [--resume] [--steps 300] [--every 50] [--batch 8] [--device cpu|cuda] [--threads 1]

A probe, not a recipe. A fresh toy UNet + motion module (and WORKDIR's text encoder, trained with them) learns
only the pure-noise end of zero-terminal-SNR v-prediction (t >= 990): there the noisy clip says nothing, so
the best output is the caption's mean clip, whose track only the direction word sets, and whose colour only
the colour word sets. Printed once at the start (FLOORS): the x_0 error of mean clips that know only some of
the words, where a model that has learnt just those words stalls; then every --every steps: the x_0 error at
t = 999 with the direction (or colour) word flipped / with the true caption - 1 on 32 training clips
(0: the word is unused).

Switches, one question each: --mean-targets trains towards each caption's mean clip instead of the clip (the
best output at pure noise, without the clip-to-clip spread in the gradient); --fresh-text-encoder starts the
text encoder afresh (WORKDIR's hardly tells the direction words apart); --coords adds each pixel's x and y as
channels (CoordConv) and --frame-index its frame number; --blank-input shows the UNet zeros instead of noise;
--mid-block adds AnimateLCM's mid-block motion module; --unet-channels sets the UNet's levels (a third level
puts a 4x4 grid at the bottom, where zero padding tells every cell where it is); --stf-targets trains towards
the posterior mean over the clip's same-caption clips (diffusion_loss's reference; the caption's mean clip at
pure noise, the clip itself where it shows), and --min-timestep widens the trained noise levels below 990.
--resume starts from WORKDIR's teacher (teacher/unet, teacher_motion, its text encoder) instead of a fresh model:
does a chain teacher pick the word up at pure noise, and with which targets?
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from lcm_edge.distill import consistency as C
from lcm_edge.distill.data import read_latents
from lcm_edge.distill.default_model.checks import OPPOSITE
from lcm_edge.distill.default_model.clips import caption_ids
from lcm_edge.distill.default_model.pretrain import (ToyArchitecture, alphas_cumprod, build_motion_adapter,
                                                     build_text_encoder, build_unet)
from lcm_edge.distill.pretrain import diffusion_loss, same_caption_reference
from lcm_edge.distill.synthetic import COLOURS

OTHER_COLOUR = dict(zip(COLOURS, list(COLOURS)[1:] + list(COLOURS)[:1]))


def with_channels(x: torch.Tensor, coords: bool, frame_index: bool) -> torch.Tensor:
    """(B, C, F, h, w) -> (B, C + extra, F, h, w): each pixel's x and y in [-1, 1] (coords) and/or its frame's
    index in [-1, 1] (frame_index) appended as constant channels."""
    b, _, f, h, w = x.shape
    extra = []
    if coords:
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        extra.append(torch.stack([xs, ys])[None, :, None].expand(b, 2, f, h, w))
    if frame_index:
        extra.append(torch.linspace(-1, 1, f)[None, None, :, None, None].expand(b, 1, f, h, w))
    return torch.cat([x, *(e.to(x) for e in extra)], dim=1)


def sharing_words(captions: list[str], i: int, keep: tuple[int, ...]) -> list[int]:
    """Indices of the captions whose words at positions `keep` ("a {colour} {shape} moving {direction}": 1, 2,
    4) are those of caption i, i itself included."""
    def key(caption: str) -> tuple[str, ...]:
        words = caption.split()
        return tuple(words[k] for k in keep)
    return [j for j, c in enumerate(captions) if key(c) == key(captions[i])]


def mean_clip_floors(latents: torch.Tensor, captions: list[str], probe: list[int]) -> dict[str, float]:
    """x_0 error on the probe clips of the mean of the other training clips that share the named caption words:
    what an output that knows only those words can reach at pure noise ("colour" about where a model that has
    learnt only the colour word stalls)."""
    words = {"colour": (1,), "colour+shape": (1, 2), "colour+direction": (1, 4), "global": ()}
    floors = {}
    for name, keep in words.items():
        errors = [(latents[[j for j in sharing_words(captions, i, keep) if j != i]].mean(0) - latents[i]).pow(2).mean()
                  for i in probe]
        floors[name] = round(float(torch.stack(errors).mean()), 4)
    return floors


def main(argv: list[str] | None = None) -> int:
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path, help="a chain WORKDIR (latents, teacher/tokenizer, teacher/text_encoder)")
    parser.add_argument("--coords", action="store_true", help="give every pixel its x and y (CoordConv)")
    parser.add_argument("--frame-index", action="store_true",
                        help="diagnostic: give every pixel its frame's index, which the motion modules' attention "
                             "otherwise has to carry into the features")
    parser.add_argument("--blank-input", action="store_true",
                        help="diagnostic: the UNet sees zeros instead of the noisy clip (a layout from the words "
                             "and the extra channels alone, no noise to see through)")
    parser.add_argument("--fresh-text-encoder", action="store_true",
                        help="a freshly initialised text encoder instead of WORKDIR's (whose output hardly differs "
                             "between direction words)")
    parser.add_argument("--mean-targets", action="store_true",
                        help="diagnostic: train towards each caption's mean clip instead of the clip itself (the "
                             "best pure-noise output, without the clip-to-clip spread in the gradient)")
    parser.add_argument("--mid-block", action="store_true",
                        help="add a motion module to the mid block, as AnimateLCM's adapter has (use_motion_mid_block)")
    parser.add_argument("--unet-channels", default=None,
                        help="the UNet's channels per level, e.g. 32,64,64 (default: ToyArchitecture's)")
    parser.add_argument("--stf-targets", action="store_true",
                        help="train towards the posterior mean of x_0 over the clip's same-caption clips "
                             "(Stable Target Field; diffusion_loss's reference)")
    parser.add_argument("--min-timestep", type=int, default=990,
                        help="train on t >= this (990: only where the noisy clip says nothing)")
    parser.add_argument("--resume", action="store_true",
                        help="start from WORKDIR's teacher (a zero-terminal-SNR v-prediction chain's) instead of "
                             "a fresh UNet and motion module")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50, help="steps between readings")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (a GPU runs the ~10k-step probe in minutes)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch build sees no CUDA device; use --device cpu")
    device = torch.device(args.device)
    if args.mean_targets and args.stf_targets:
        parser.error("--mean-targets and --stf-targets are two different targets: give one")
    if args.resume and (args.coords or args.frame_index or args.mid_block or args.unet_channels):
        parser.error("--resume takes WORKDIR's teacher as it is: drop --coords, --frame-index, --mid-block and "
                     "--unet-channels")
    arch = ToyArchitecture(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    if args.unet_channels:
        try:
            channels = tuple(int(c) for c in args.unet_channels.split(","))
        except ValueError:
            parser.error(f"--unet-channels {args.unet_channels!r}: give integers separated by commas, e.g. 32,64,64")
        arch = dataclasses.replace(arch, unet_channels=channels)
    acp = alphas_cumprod(arch).to(device)
    latents, captions = read_latents(args.workdir / "latents")
    tokenizer = CLIPTokenizer.from_pretrained(args.workdir / "teacher" / "tokenizer")
    torch.manual_seed(args.seed)
    text_encoder = build_text_encoder(arch, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id) \
        if args.fresh_text_encoder else CLIPTextModel.from_pretrained(args.workdir / "teacher" / "text_encoder")
    arch = dataclasses.replace(arch, motion_mid_block=args.mid_block)
    if args.resume:
        unet = UNet2DConditionModel.from_pretrained(args.workdir / "teacher" / "unet")
        adapter = MotionAdapter.from_pretrained(args.workdir / "teacher_motion")
    else:
        torch.manual_seed(args.seed)  # the same UNet whichever text encoder
        plain = build_unet(arch)
        extra = 2 * args.coords + args.frame_index
        unet = UNet2DConditionModel.from_config({**plain.config, "in_channels": arch.latent_channels + extra}) \
            if extra else plain
        adapter = build_motion_adapter(arch)
    model = UNetMotionModel.from_unet2d(unet, adapter).to(device)
    text_encoder.to(device)
    ids = caption_ids(tokenizer, captions, arch).to(device)
    params = list(model.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)

    def denoise(x_t, t, caption_ids):
        text = text_encoder(caption_ids).last_hidden_state.repeat_interleave(x_t.shape[2], dim=0)
        x_t = torch.zeros_like(x_t) if args.blank_input else x_t
        return model(with_channels(x_t, args.coords, args.frame_index), t, encoder_hidden_states=text).sample

    probe = torch.randperm(len(captions), generator=torch.Generator().manual_seed(1))[:32].tolist()
    probe_noise = torch.randn(latents[probe].shape, generator=torch.Generator().manual_seed(2)).to(device)
    print("FLOORS " + json.dumps(mean_clip_floors(latents, captions, probe)), flush=True)
    latents = latents.to(device)
    probe_latents = latents[probe]
    targets = latents
    if args.mean_targets:
        firsts = {c: i for i, c in reversed(list(enumerate(captions)))}
        means = {c: latents[sharing_words(captions, i, (1, 2, 4))].mean(0) for c, i in firsts.items()}
        targets = torch.stack([means[c] for c in captions])
    groups = tuple(t.to(device) for t in same_caption_reference(captions)) if args.stf_targets else None

    @torch.no_grad()
    def gains() -> dict[str, float]:
        model.eval()
        text_encoder.eval()
        t = torch.full((len(probe),), 999, device=device)
        x_t = C.add_noise(probe_latents, probe_noise, t, acp)  # pure noise at zero terminal SNR
        errors = {}
        for name, swap in (("true", {}), ("direction", OPPOSITE), ("colour", OTHER_COLOUR)):
            flipped = [" ".join(swap.get(w, w) for w in captions[i].split()) for i in probe]
            v = denoise(x_t, t, caption_ids(tokenizer, flipped, arch).to(device))
            x0 = C.predicted_original_sample(v, x_t, acp[999].sqrt(), (1 - acp[999]).sqrt(), arch.prediction_type)
            errors[name] = float((x0 - probe_latents).pow(2).mean())
        model.train()
        text_encoder.train()
        return {"x0_error": errors["true"], "direction_gain": errors["direction"] / errors["true"] - 1,
                "colour_gain": errors["colour"] / errors["true"] - 1}

    model.train()
    text_encoder.train()
    switches = {k: v for k, v in vars(args).items() if isinstance(v, bool)}
    switches.update(unet_channels=list(arch.unet_channels), min_timestep=args.min_timestep)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(captions), (args.batch,), generator=gen).to(device)
        reference = dict(reference=latents[groups[0][idx]], reference_mask=groups[1][idx]) if groups else {}
        loss = diffusion_loss(denoise, targets[idx], ids[idx], acp, arch.prediction_type, gen,
                              min_timestep=args.min_timestep, **reference)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.every == 0 or step == args.steps:
            row = {**switches, "step": step, "loss": loss.item(), **gains(),
                   "elapsed_s": round(time.perf_counter() - start)}
            print("RESULT " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does an image teacher draw the direction cue (a trail, a shaded back half, an eye) on the side the word says?

    python benchmarks/default_model_trail_side.py TEACHER_FOLDER [--cue trail|eye] [--combos 6] [--steps 25]
        [--threads N]

TEACHER_FOLDER is a chain's workdir/teacher right after step 4 (unet, vae, text_encoder, tokenizer; step 5
rewrites its unet). For each colour-shape pair, the same noise is sampled (DDIM, guidance 5) with each of
the four direction words; every frame is an independent image. Each image's trail side is read from its
pixels: the centroid of the shape's core (at least 0.7 of the frame's contrast) minus the centroid of the
fainter halo around it points the way the shape moves (synthetic.TRAIL is drawn behind it, a back_opacity < 1
shades its back half). Prints the rate at which that side matches the word (chance 0.25) and how far apart
the four words' images are (0-255). On clips drawn with a 0.5 trail or back_opacity 0.45 the reading is right
for every frame; on plain clips it reads ~0.16. --cue eye reads the hole in the shape instead (`eye_side`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

from lcm_edge.distill.default_model.detector import FOREGROUND_DISTANCE, background_colour
from lcm_edge.distill.synthetic import DIRECTIONS, caption_for

PAIRS = (("red", "circle"), ("blue", "square"), ("yellow", "triangle"), ("green", "circle"), ("white", "square"),
         ("red", "triangle"), ("green", "square"), ("blue", "triangle"))
CORE_FRACTION = 0.7  # of the frame's 99.5th-percentile distance from the background: the shape, not its trail
HALO_DISTANCE = 25.0  # RGB distance from the background above which a pixel is trail or edge, not background


def _pointing(towards: np.ndarray, source: np.ndarray) -> str | None:
    """The direction from the centroid of mask `source` to that of mask `towards`; None under a pixel."""
    ys, xs = np.nonzero(towards)
    ys0, xs0 = np.nonzero(source)
    vx, vy = xs.mean() - xs0.mean(), ys.mean() - ys0.mean()
    if max(abs(vx), abs(vy)) < 1.0:
        return None
    step = (int(np.sign(vx)), 0) if abs(vx) >= abs(vy) else (0, int(np.sign(vy)))
    return next(name for name, d in DIRECTIONS.items() if d == step)


def trail_side(frame: np.ndarray) -> str | None:
    """The direction the shape in one uint8 (H, W, 3) frame moves, read from where its trail lies; None if unclear."""
    distance = np.linalg.norm(frame.astype(np.float32) - background_colour(frame[None]), axis=-1)
    threshold = max(FOREGROUND_DISTANCE, CORE_FRACTION * float(np.percentile(distance, 99.5)))
    core, halo = distance > threshold, (distance > HALO_DISTANCE) & (distance <= threshold)
    if core.sum() < 10 or halo.sum() < 10:
        return None
    return _pointing(core, halo)


def eye_side(frame: np.ndarray) -> str | None:
    """The way the shape in one uint8 (H, W, 3) frame looks: from its centre to the hole its eye leaves
    (synthetic.draw_shape's `eye`); None without a hole."""
    distance = np.linalg.norm(frame.astype(np.float32) - background_colour(frame[None]), axis=-1)
    count, labels, stats, _ = cv2.connectedComponentsWithStats((distance > FOREGROUND_DISTANCE).astype(np.uint8))
    if count <= 1:
        return None
    shape = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    contours, _ = cv2.findContours(shape, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = cv2.drawContours(np.zeros_like(shape), contours, -1, 1, thickness=cv2.FILLED).astype(bool)
    hole = filled & ~shape.astype(bool)
    if hole.sum() < 2:
        return None
    return _pointing(hole, filled)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", type=Path)
    parser.add_argument("--cue", choices=("trail", "eye"), default="trail",
                        help="trail: a trail or shaded back (trail_side); eye: the eye's hole (eye_side)")
    parser.add_argument("--combos", type=int, default=6, help=f"colour-shape pairs, at most {len(PAIRS)}")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if not 1 <= args.combos <= len(PAIRS):
        parser.error(f"--combos must be in 1..{len(PAIRS)}")

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from lcm_edge.distill.default_model.chain import caption_ids
    from lcm_edge.distill.default_model.pretrain import ToyArchitecture, sample_teacher

    if args.threads:
        torch.set_num_threads(args.threads)
    arch = ToyArchitecture()
    unet = UNet2DConditionModel.from_pretrained(args.teacher / "unet").eval()
    vae = AutoencoderKL.from_pretrained(args.teacher / "vae").eval()
    text_encoder = CLIPTextModel.from_pretrained(args.teacher / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(args.teacher / "tokenizer")
    empty = caption_ids(tokenizer, [""], arch)[0]
    read = eye_side if args.cue == "eye" else trail_side
    hits, reads, gaps = 0, 0, []
    for k, (colour, shape) in enumerate(PAIRS[:args.combos]):
        clips = [sample_teacher(vae, unet, text_encoder, caption_ids(tokenizer, [caption_for(colour, shape, d)], arch),
                                empty, arch, steps=args.steps, seed=k)[0] for d in DIRECTIONS]
        for direction, clip in zip(DIRECTIONS, clips):
            hits += sum(read(frame) == direction for frame in clip)
            reads += len(clip)
        gaps.append(float(np.mean([np.abs(clips[i].astype(np.float32) - clips[j]).mean()
                                   for i in range(len(clips)) for j in range(i + 1, len(clips))])))
        print(f"{colour} {shape}: same-noise gap between direction words {gaps[-1]:.2f}/255", flush=True)
    print(json.dumps({"cue": args.cue, "side_rate": hits / reads, "chance": 1 / len(DIRECTIONS), "images": reads,
                      "same_noise_gap": float(np.mean(gaps))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

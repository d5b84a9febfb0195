"""Synthetic text-to-video data made by code: coloured shapes moving in a straight line.

Deterministic by seed. Each clip keeps its ground truth (colour, shape, direction, path), so a later
evaluation can check a generated clip against its prompt, not only against a teacher. Captions read
"a {colour} {shape} moving {direction}".

    clips = synthetic_clips(64, seed=0, size=32, num_frames=8)
    write_video_dataset("data/shapes", clips)          # mp4 + captions.csv + attributes.jsonl (data.kind "videos")
    write_image_dataset("data/shapes_img", clips)      # first frames as PNG (data.kind "images")
    write_pixel_latents("data/shapes_lat", clips, 8)   # pixel-space "latents", no VAE (data.kind "latents")
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lcm_edge.errors import InvalidArgumentError

from .errors import DatasetError

COLOURS: dict[str, tuple[int, int, int]] = {  # RGB
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND = (40, 40, 40)


@dataclass(frozen=True)
class ShapeClip:
    caption: str
    colour: str
    shape: str
    direction: str
    radius: float  # pixels
    start: tuple[float, float]  # centre (x, y) in frame 0, pixels
    speed: float  # pixels per frame
    frames: np.ndarray  # (F, H, W, 3) uint8 RGB

    def attributes(self) -> dict:
        d = asdict(self)
        del d["frames"]
        d["centres"] = [list(c) for c in self.centres()]
        return d

    def centres(self) -> list[tuple[float, float]]:
        dx, dy = DIRECTIONS[self.direction]
        return [(self.start[0] + dx * self.speed * i, self.start[1] + dy * self.speed * i)
                for i in range(len(self.frames))]


def caption_for(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


def draw_shape(image: np.ndarray, shape: str, centre: tuple[float, float], radius: float,
               colour: tuple[int, int, int]) -> None:
    """Draw in place, anti-aliased by 4x supersampling of the coverage mask."""
    coverage = shape_coverage(shape, centre, radius, image.shape[0], image.shape[1])
    image[:] = (image * (1 - coverage) + np.asarray(colour, np.float32) * coverage).round().astype(np.uint8)


def shape_coverage(shape: str, centre: tuple[float, float], radius: float, h: int, w: int) -> np.ndarray:
    """(h, w, 1) float in [0, 1]: the fraction of each pixel inside the shape (4x4 supersampled)."""
    ss = 4
    ys, xs = np.mgrid[0:h * ss, 0:w * ss]
    x = (xs + 0.5) / ss - centre[0]
    y = (ys + 0.5) / ss - centre[1]
    if shape == "circle":
        inside = x * x + y * y <= radius * radius
    elif shape == "square":
        inside = (np.abs(x) <= radius * 0.85) & (np.abs(y) <= radius * 0.85)
    elif shape == "triangle":  # pointing up
        inside = (y <= radius * 0.8) & (y >= -radius) & (np.abs(x) <= (y + radius) * 0.6)
    else:
        raise InvalidArgumentError("shape", f"{shape!r} is not a known shape", f"use one of {list(SHAPES)}")
    return inside.reshape(h, ss, w, ss).mean(axis=(1, 3))[..., None]


# A shape's radius, as a fraction of the frame side (drawn uniformly in this range).
RADIUS = (0.14, 0.2)
# How far a shape travels, first to last frame, as a fraction of the frame side (drawn uniformly in this range).
DEFAULT_TRAVEL = (0.3, 0.45)


def make_clip(colour: str, shape: str, direction: str, *, size: int, num_frames: int,
              rng: np.random.Generator, travel: tuple[float, float] = DEFAULT_TRAVEL) -> ShapeClip:
    """One clip: the shape enters nowhere and leaves nowhere; it stays inside the frame throughout.

    `travel`: the range of the path's length, first to last frame, as a fraction of the frame side (drawn
    uniformly). A path longer than the shape shows in a noisy clip as soon as the shape does.
    """
    low, high = travel
    longest = 1.0 - 2 * RADIUS[1] - 2 / size  # the path and the largest shape, with a pixel's margin, fit the frame
    if not 0.0 < low <= high <= longest:
        raise InvalidArgumentError("travel", f"{travel} is not a range inside (0, {longest:.3f}]",
                                   "give (low, high) with 0 < low <= high, short enough to keep the shape in frame")
    radius = size * rng.uniform(*RADIUS)
    speed = size * rng.uniform(low, high) / max(num_frames - 1, 1)
    travel = speed * (num_frames - 1)
    dx, dy = DIRECTIONS[direction]
    margin = radius + 1

    def start_coord(d: int) -> float:
        lo, hi = margin, size - margin
        if d > 0:
            hi -= travel
        elif d < 0:
            lo += travel
        return float(rng.uniform(lo, hi))

    start = (start_coord(dx), start_coord(dy))
    clip = ShapeClip(caption_for(colour, shape, direction), colour, shape, direction, float(radius), start,
                     float(speed), np.empty((num_frames, size, size, 3), np.uint8))
    for i, centre in enumerate(clip.centres()):
        frame = np.empty((size, size, 3), np.uint8)
        frame[:] = BACKGROUND
        draw_shape(frame, shape, centre, radius, COLOURS[colour])
        clip.frames[i] = frame
    return clip


def synthetic_clips(count: int, *, seed: int = 0, size: int = 32, num_frames: int = 8,
                    travel: tuple[float, float] = DEFAULT_TRAVEL) -> list[ShapeClip]:
    """`count` clips cycling through every (colour, shape, direction) in a seeded order (travel: see make_clip)."""
    combos = [(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(combos))
    return [make_clip(*combos[order[i % len(combos)]], size=size, num_frames=num_frames, rng=rng,
                      travel=travel) for i in range(count)]


def write_video_dataset(folder: str | Path, clips: list[ShapeClip], *, fps: int = 8) -> Path:
    """mp4 clips + captions.csv (file,caption) + attributes.jsonl (ground truth), for data.kind "videos"."""
    import cv2

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, clip in enumerate(clips):
        name = f"clip_{i:05d}.mp4"
        h, w = clip.frames.shape[1:3]
        writer = cv2.VideoWriter(str(folder / name), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h))
        if not writer.isOpened():
            raise DatasetError(str(folder / name), "OpenCV cannot write an mp4v video here",
                               "install opencv-python-headless (its wheels carry the mp4v encoder)")
        for frame in clip.frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
        rows.append((name, clip))
    _write_tables(folder, rows)
    return folder


def write_image_dataset(folder: str | Path, clips: list[ShapeClip], *, frame: int = 0) -> Path:
    """One PNG per clip (its `frame`-th frame) + captions.csv + attributes.jsonl, for data.kind "images"."""
    import cv2

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, clip in enumerate(clips):
        name = f"image_{i:05d}.png"
        cv2.imwrite(str(folder / name), cv2.cvtColor(clip.frames[frame], cv2.COLOR_RGB2BGR))
        rows.append((name, clip))
    _write_tables(folder, rows)
    return folder


def pixel_latents(frames: np.ndarray, latent_size: int) -> np.ndarray:
    """(F, H, W, 3) uint8 -> (4, F, s, s) float32: an identity "autoencoder" for latent-space experiments.

    Channels: R, G, B in [-1, 1] and their mean, area-downsampled to s x s. Samples decode by reading
    the first three channels back as colours, so figures stay readable without a trained VAE.
    """
    import cv2

    small = np.stack([cv2.resize(f, (latent_size, latent_size), interpolation=cv2.INTER_AREA) for f in frames])
    rgb = small.astype(np.float32) / 127.5 - 1.0  # (F, s, s, 3)
    four = np.concatenate([rgb, rgb.mean(axis=-1, keepdims=True)], axis=-1)
    return np.ascontiguousarray(four.transpose(3, 0, 1, 2))


def latents_to_rgb(latents: np.ndarray) -> np.ndarray:
    """Inverse of pixel_latents for display: (4, F, s, s) -> (F, s, s, 3) uint8."""
    rgb = np.clip((latents[:3].transpose(1, 2, 3, 0) + 1.0) * 127.5, 0, 255)
    return rgb.round().astype(np.uint8)


def write_pixel_latents(folder: str | Path, clips: list[ShapeClip], latent_size: int, *,
                        images: bool = False) -> Path:
    """A latents folder (data.write_latents) of pixel_latents, for data.kind "latents", with attributes.jsonl.

    images=True stores every frame as its own (4, s, s) image sample (stage "image" data).
    """
    from .data import write_latents

    samples, rows = [], []
    for i, clip in enumerate(clips):
        lat = pixel_latents(clip.frames, latent_size)
        for j, sample in enumerate([lat[:, f] for f in range(lat.shape[1])] if images else [lat]):
            name = f"latent_{i:05d}_{j:03d}.safetensors" if images else f"latent_{i:05d}.safetensors"
            samples.append((name, sample, clip.caption))
            rows.append((name, clip))
    folder = write_latents(folder, samples)
    _write_attributes(folder, rows)
    return folder


def _write_tables(folder: Path, rows: list[tuple[str, ShapeClip]]) -> None:
    with (folder / "captions.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "caption"])
        for name, clip in rows:
            writer.writerow([name, clip.caption])
    _write_attributes(folder, rows)


def _write_attributes(folder: Path, rows: list[tuple[str, ShapeClip]]) -> None:
    with (folder / "attributes.jsonl").open("w", encoding="utf-8") as f:
        for name, clip in rows:
            f.write(json.dumps({"file": name, **clip.attributes()}) + "\n")

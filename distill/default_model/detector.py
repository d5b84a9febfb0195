"""Read a generated clip back: the object's colour, shape and track, hence its direction.

numpy + opencv only (no torch), so it scores clips from the torch-free runtime. The palette
is the synthetic data's own (`lcm_edge.distill.synthetic`), so "red" means the red the model
was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ..synthetic import COLOURS, DIRECTIONS, SHAPES

# A pixel belongs to the object when it is this far (RGB Euclidean) from the background.
FOREGROUND_DISTANCE = 60.0
# Components smaller than this fraction of the frame are noise, not the object.
MIN_AREA_FRACTION = 0.01
# The track must cover this fraction of the frame side to count as moving.
MIN_TRAVEL_FRACTION = 0.08


@dataclass(frozen=True)
class Detection:
    colour: str | None
    shape: str | None
    direction: str | None
    present_fraction: float  # frames in which an object was found
    travel: float  # pixels along the dominant axis, first to last frame (fitted)
    track_residual: float  # RMS distance of centroids from the fitted straight line, pixels
    area_stability: float  # 1 - mean relative change of the object's area between frames (1 = constant)

    def matches(self, colour: str, shape: str, direction: str) -> dict[str, bool]:
        return {"colour": self.colour == colour, "shape": self.shape == shape, "direction": self.direction == direction}


def background_colour(frames: np.ndarray) -> np.ndarray:
    """The median colour of the border pixels of (F, H, W, 3) frames."""
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)
    return np.median(border.reshape(-1, 3), axis=0)


def _shape_of(mask: np.ndarray) -> str:
    """Fill ratio of the bounding box: square ~1, circle ~pi/4, triangle ~1/2."""
    ys, xs = np.nonzero(mask)
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    fill = mask.sum() / box
    if fill >= 0.88:
        return "square"
    if fill >= 0.64:
        return "circle"
    return "triangle"


def detect(frames: np.ndarray) -> Detection:
    """frames: uint8 (F, H, W, 3) RGB."""
    f, h, w, _ = frames.shape
    background = background_colour(frames)
    distance = np.linalg.norm(frames.astype(np.float32) - background, axis=-1)
    centres, areas, shapes, pixels = [], [], [], []
    for i in range(f):
        mask = (distance[i] > FOREGROUND_DISTANCE).astype(np.uint8)
        count, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
        if count <= 1:
            continue
        best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        if stats[best, cv2.CC_STAT_AREA] < MIN_AREA_FRACTION * h * w:
            continue
        component = labels == best
        centres.append((i, *centroids[best]))
        areas.append(float(component.sum()))
        shapes.append(_shape_of(component))
        pixels.append(frames[i][component])
    if len(centres) < 2:
        return Detection(None, None, None, len(centres) / f, 0.0, 0.0, 0.0)

    rgb = np.median(np.concatenate(pixels), axis=0)
    colour = min(COLOURS, key=lambda name: float(np.linalg.norm(rgb - np.asarray(COLOURS[name]))))
    shape = max(SHAPES, key=shapes.count)

    t, x, y = (np.asarray(v, np.float64) for v in zip(*centres))
    fit_x, fit_y = np.polyfit(t, x, 1), np.polyfit(t, y, 1)
    dx, dy = fit_x[0] * (f - 1), fit_y[0] * (f - 1)
    residual = float(np.sqrt(np.mean((np.polyval(fit_x, t) - x) ** 2 + (np.polyval(fit_y, t) - y) ** 2)))
    travel = max(abs(dx), abs(dy))
    direction = None
    if travel >= MIN_TRAVEL_FRACTION * max(h, w):
        step = (int(np.sign(dx)), 0) if abs(dx) >= abs(dy) else (0, int(np.sign(dy)))
        direction = next(name for name, d in DIRECTIONS.items() if d == step)
    a = np.asarray(areas)
    stability = float(max(0.0, 1.0 - np.mean(np.abs(np.diff(a))) / a.mean())) if len(a) > 1 else 0.0
    return Detection(colour, shape, direction, len(centres) / f, float(travel), residual, stability)

"""How close two clips are: the one PSNR every gate and benchmark reads (numpy only)."""

from __future__ import annotations

import numpy as np


def psnr_db(reference: np.ndarray, actual: np.ndarray, peak: float = 255.0) -> float:
    """PSNR (dB) over whole arrays: peak 255 for uint8 frames, 1.0 for [0, 1] pixels; inf where identical."""
    mse = float(np.mean((reference.astype(np.float64) - actual.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(peak**2 / mse))


def frame_psnr_db(reference: np.ndarray, actual: np.ndarray, peak: float = 255.0) -> np.ndarray:
    """PSNR (dB) of each frame of two (frames, ...) clips; inf where a frame is identical."""
    diff = reference.astype(np.float64) - actual.astype(np.float64)
    mse = (diff**2).reshape(diff.shape[0], -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(peak**2 / mse)

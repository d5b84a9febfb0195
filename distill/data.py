"""Datasets: image-text pairs, video-text clips (OpenCV), pre-computed VAE latents; a resumable sampler.

Folder layouts (`data.root`):

    images   captions.csv  (columns file,caption)  or captions.jsonl ({"file": ..., "caption"|"text": ...})
             + the image files, paths relative to root
    videos   captions.csv  with file,caption, or WebVid's videoid,name[,page_dir] (file = [page_dir/]videoid.mp4)
             + the video files
    latents  latents.jsonl ({"file": "000000.safetensors", "caption": ...}) + one safetensors file per
             sample holding "latents": (4, h, w) or (4, frames, h, w), already times the VAE scaling factor
             (written by `precompute_latents`)

Randomness (crop position, flip, first frame) comes from a per-draw seed that `StepSampler` hands to the
dataset with the index, so a resumed run draws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .config import DataConfig
from .errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Record:
    file: str
    caption: str


def read_records(root: Path, captions: str, kind: str) -> list[Record]:
    """Rows of a captions CSV/JSONL as (file, caption); every file must exist."""
    path = root / captions
    if not path.is_file():
        raise DatasetError(str(path), "captions file not found",
                           f"write {captions} into data.root or set data.captions to its name")
    if path.suffix == ".jsonl":
        records = _read_jsonl(path)
    elif path.suffix == ".csv":
        records = _read_csv(path, kind)
    else:
        raise DatasetError(str(path), f"suffix {path.suffix!r} is not .csv or .jsonl", "use a .csv or .jsonl file")
    if not records:
        raise DatasetError(str(path), "has no rows", "add at least one sample")
    missing = [r.file for r in records if not (root / r.file).is_file()]
    if missing:
        raise DatasetError(str(path), f"{len(missing)} listed file(s) do not exist under {root}, e.g. {missing[:3]}",
                           "remove those rows or add the files (paths are relative to data.root)")
    return records


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{line_no}", f"not valid JSON ({exc})", "write one JSON object per line") from exc
        caption = row.get("caption", row.get("text"))
        if not isinstance(row.get("file"), str) or not isinstance(caption, str):
            raise DatasetError(f"{path}:{line_no}", f"needs string keys 'file' and 'caption' (or 'text'), got {row}",
                               'write lines like {"file": "a.png", "caption": "a red circle"}')
        records.append(Record(row["file"], caption))
    return records


def _read_csv(path: Path, kind: str) -> list[Record]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or [])
        if {"file", "caption"} <= columns:
            return [Record(row["file"], row["caption"]) for row in reader]
        if kind == "videos" and {"videoid", "name"} <= columns:  # WebVid's metadata CSV
            paged = "page_dir" in columns
            return [Record(f"{row['page_dir']}/{row['videoid']}.mp4" if paged else f"{row['videoid']}.mp4",
                           row["name"]) for row in reader]
    webvid = " (or WebVid's videoid,name[,page_dir])" if kind == "videos" else ""
    raise DatasetError(str(path), f"has columns {sorted(columns)}", f"use columns file,caption{webvid}")


# ----------------------------------------------------------------------------------------------
# Pixels


def resize_and_crop(frames: np.ndarray, resolution: int, rng: np.random.Generator | None,
                    flip: bool = False) -> np.ndarray:
    """(F, H, W, 3) uint8 -> (F, 3, r, r) float32 in [-1, 1]: shorter side to r, then a square crop.

    `rng` None: center crop; else a random crop (the same for every frame). `flip` mirrors horizontally.
    """
    import cv2

    f, h, w, _ = frames.shape
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = np.stack([cv2.resize(fr, (nw, nh), interpolation=interp) for fr in frames])
    if rng is None:
        top, left = (nh - resolution) // 2, (nw - resolution) // 2
    else:
        top, left = int(rng.integers(0, nh - resolution + 1)), int(rng.integers(0, nw - resolution + 1))
    out = resized[:, top:top + resolution, left:left + resolution]
    if flip:
        out = out[:, :, ::-1]
    return (out.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0).copy()


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3)."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(str(path), "OpenCV cannot decode this image", "convert it to PNG or JPEG, or drop it")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_video_frames(path: Path, num_frames: int, frame_stride: int, rng: np.random.Generator | None) -> np.ndarray:
    """`num_frames` RGB frames (F, H, W, 3), every `frame_stride`-th, from a random (or the first) start.

    A clip too short for the stride is sampled with the largest stride that fits; a clip with fewer than
    `num_frames` frames is an error (silently repeating frames would teach the motion module to freeze).
    """
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise DatasetError(str(path), "OpenCV cannot open this video", "re-encode it (H.264 MP4) or drop it")
    try:
        frames = []
        while True:  # decode everything: frame counts in headers are unreliable, seeking more so
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(frame)
    finally:
        cap.release()
    total = len(frames)
    if total < num_frames:
        raise DatasetError(str(path), f"has {total} frame(s), fewer than data.num_frames = {num_frames}",
                           "drop short clips from the captions file or lower data.num_frames")
    stride = min(frame_stride, (total - 1) // max(num_frames - 1, 1)) if num_frames > 1 else 1
    span = (num_frames - 1) * stride + 1
    start = int(rng.integers(0, total - span + 1)) if rng is not None else 0
    picked = [cv2.cvtColor(frames[start + i * stride], cv2.COLOR_BGR2RGB) for i in range(num_frames)]
    return np.stack(picked)


class MediaDataset(Dataset):
    """Images or videos with captions; items are {"pixels": (3|F×3, r, r) in [-1, 1], "caption": str}.

    Indexed by (index, seed): the seed drives crop, flip and the clip's first frame.
    """

    def __init__(self, cfg: DataConfig):
        if cfg.kind not in ("images", "videos"):
            raise DatasetError(cfg.root, f"MediaDataset reads images or videos, not {cfg.kind}",
                               "use LatentDataset for latents")
        self.cfg = cfg
        self.root = Path(cfg.root)
        self.records = read_records(self.root, cfg.captions_file, cfg.kind)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        record = self.records[index]
        rng = np.random.default_rng(seed)
        path = self.root / record.file
        if self.cfg.kind == "images":
            frames = read_image(path)[None]
        else:
            frames = read_video_frames(path, self.cfg.num_frames, self.cfg.frame_stride, rng)
        flip = bool(self.cfg.random_flip and rng.random() < 0.5)
        pixels = resize_and_crop(frames, self.cfg.resolution, None if self.cfg.center_crop else rng, flip)
        pixels = torch.from_numpy(pixels[0] if self.cfg.kind == "images" else pixels)
        return {"pixels": pixels, "caption": _maybe_drop(record.caption, self.cfg.empty_prompt_probability, rng)}


class LatentDataset(Dataset):
    """Pre-computed latents: items are {"latents": (4, h, w) or (4, F, h, w), "caption": str}."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.root = Path(cfg.root)
        self.records = read_records(self.root, cfg.captions_file, "latents")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        from safetensors.torch import load_file

        index, seed = key
        record = self.records[index]
        path = self.root / record.file
        tensors = load_file(str(path))
        if "latents" not in tensors:
            raise DatasetError(str(path), f"has tensors {sorted(tensors)}, no 'latents'",
                               "write it with precompute_latents()")
        latents = tensors["latents"].float()
        if latents.ndim not in (3, 4):
            raise DatasetError(str(path), f"latents have shape {list(latents.shape)}",
                               "store (4, h, w) for images or (4, frames, h, w) for videos")
        rng = np.random.default_rng(seed)
        if latents.ndim == 4:
            latents = _latent_clip(latents, self.cfg.num_frames, path, rng)
        if self.cfg.random_flip and rng.random() < 0.5:
            latents = latents.flip(-1)
        return {"latents": latents, "caption": _maybe_drop(record.caption, self.cfg.empty_prompt_probability, rng)}


def _latent_clip(latents: torch.Tensor, num_frames: int, path: Path, rng: np.random.Generator) -> torch.Tensor:
    total = latents.shape[1]
    if total < num_frames:
        raise DatasetError(str(path), f"holds {total} latent frames, fewer than data.num_frames = {num_frames}",
                           "lower data.num_frames or precompute longer clips")
    start = int(rng.integers(0, total - num_frames + 1))
    return latents[:, start:start + num_frames]


def _maybe_drop(caption: str, probability: float, rng: np.random.Generator) -> str:
    return "" if probability > 0 and rng.random() < probability else caption


def make_dataset(cfg: DataConfig) -> Dataset:
    return LatentDataset(cfg) if cfg.kind == "latents" else MediaDataset(cfg)


# ----------------------------------------------------------------------------------------------
# The sampler


class StepSampler(Sampler):
    """An endless, seeded stream of (index, draw seed), sharded over processes, that can start mid-stream.

    Draw number s (counted over all processes) takes index perm_e[s mod n] with perm_e a seeded
    permutation of epoch e = s // n, and draw seed hash(seed, s). Micro-batch q of process r holds draws
    (q * world + r) * batch + j. Starting at micro-batch `start` reproduces the stream an uninterrupted
    run would have reached, with no data-loader state to save.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1,
                 start_microbatch: int = 0):
        self.n = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start_microbatch
        self._perm_epoch = -1
        self._perm: list[int] = []

    def _index(self, s: int) -> int:
        epoch = s // self.n
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=g).tolist()
            self._perm_epoch = epoch
        return self._perm[s % self.n]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        q = self.start
        while True:
            for j in range(self.batch_size):
                s = (q * self.world_size + self.rank) * self.batch_size + j
                yield self._index(s), int(np.random.SeedSequence([self.seed, s]).generate_state(1)[0])
            q += 1

    def __len__(self) -> int:  # endless; DataLoader only needs it for progress bars
        return 2**62


# ----------------------------------------------------------------------------------------------
# Pre-computing latents


@torch.no_grad()
def precompute_latents(cfg: DataConfig, vae, out_dir: str | Path, *, batch_size: int = 16, seed: int = 0,
                       device: str | torch.device = "cpu") -> Path:
    """Encode a MediaDataset once with the VAE (mean of the posterior, times scaling_factor) into a
    `latents` folder. Crops/frames are drawn once, from `seed`; training then skips the VAE."""
    dataset = MediaDataset(cfg)

    def encoded():
        for i in range(len(dataset)):
            item = dataset[(i, int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))]
            pixels = item["pixels"]
            frames = pixels[None] if pixels.ndim == 3 else pixels
            chunks = [vae.encode(frames[k:k + batch_size].to(device, vae.dtype)).latent_dist.mean
                      for k in range(0, frames.shape[0], batch_size)]
            latents = torch.cat(chunks).float() * vae.config.scaling_factor  # (F, 4, h, w)
            latents = latents[0] if pixels.ndim == 3 else latents.permute(1, 0, 2, 3)
            yield f"{i:06d}.safetensors", latents.cpu(), dataset.records[i].caption

    return write_latents(out_dir, encoded())


LATENTS_INDEX = "latents.jsonl"


def write_latents(folder: str | Path, samples: Iterable[tuple[str, object, str]]) -> Path:
    """A data.kind "latents" folder: one safetensors file ({"latents": ...}) per sample and LATENTS_INDEX naming
    each file with its caption. `samples`: (file name, (C, h, w) or (C, F, h, w) latents as a numpy array or CPU
    tensor, caption). The index is written last, through a temporary file: a folder whose writing stopped has
    no index, so it is never read as a finished one."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, latents, caption in samples:
        array = latents.detach().cpu().numpy() if isinstance(latents, torch.Tensor) else np.asarray(latents)
        save_file({"latents": np.ascontiguousarray(array)}, str(folder / name))
        lines.append(json.dumps({"file": name, "caption": caption}))
    tmp = folder / (LATENTS_INDEX + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, folder / LATENTS_INDEX)
    return folder


def read_latents(folder: str | Path) -> tuple[torch.Tensor, list[str]]:
    """What write_latents wrote, every sample stacked (all of one shape), and their captions."""
    from safetensors.torch import load_file

    folder = Path(folder)
    records = [json.loads(line) for line in (folder / LATENTS_INDEX).read_text(encoding="utf-8").splitlines()]
    return (torch.stack([load_file(str(folder / r["file"]))["latents"] for r in records]),
            [r["caption"] for r in records])

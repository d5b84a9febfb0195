"""The one command that builds the default model from an empty folder.

    python -m lcm_edge.distill.default_model.chain WORKDIR --bundle OUT [--scale cpu|smoke] [--seed 0]

The recipe is data: `recipe()` lists the stages (data, tokenizer, VAE, image teacher, motion teacher, its video
fine-tune, the pure-noise end and its anchoring, distill stage 1, distill stage 2, export), each a frozen spec
with one `run`, and `run_recipe` runs them in order, keeping a marker per finished stage in WORKDIR/done so an
interrupted chain continues where it stopped. Every stage is the project's own code, as a full-scale user would
run it. Why each tuned value is what it is: benchmarks/research/default_model_teacher_sweep/README.md.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Protocol

import numpy as np
import torch

from ..config import two_stage_configs
from ..data import read_latents, write_latents
from ..pretrain import same_caption_reference
from .checks import check_teacher, check_vae, direction_gain, load_teacher, save_teacher
from .clips import (HELD_OUT, caption_ids, clip_frames, encode_clips, make_training_clips, prompt_form,
                    train_tokenizer)
from .pretrain import (ToyArchitecture, build_motion_adapter, build_text_encoder, build_unet, build_vae,
                       ddim_scheduler, train_image_teacher, train_motion_teacher, train_vae)

Log = Callable[[str], None]


@dataclass(frozen=True)
class ChainScale:
    """Step counts and batch sizes; "smoke" runs the identical chain in about two minutes (2 cores) for tests."""

    clips: int
    vae_steps: int
    image_steps: int
    motion_steps: int
    video_finetune_steps: int
    stage1_steps: int
    stage2_steps: int
    batch_images: int
    batch_image_teacher: int
    batch_videos: int
    vae_crop: int
    check_prompts: int
    check_steps: int
    # The pure-noise stage: `pure_noise_steps` of a `pure_noise_schedule_steps`-long warm-up + cosine, so the
    # short run stays near the peak rate; the anchor stage likewise.
    pure_noise_steps: int
    pure_noise_schedule_steps: int
    batch_pure_noise: int
    anchor_steps: int
    anchor_schedule_steps: int
    batch_anchor: int


SCALES = {
    # The shipped recipe, ~80 min on 2 CPU cores. The image teacher trains at batch 64: at 16 its shapes stayed
    # at chance after 4000 steps.
    "cpu": ChainScale(clips=1100, vae_steps=2500, image_steps=2000, motion_steps=1000, video_finetune_steps=3000,
                      stage1_steps=500, stage2_steps=500, batch_images=16, batch_image_teacher=64, batch_videos=2,
                      vae_crop=32, check_prompts=10, check_steps=25, pure_noise_steps=400,
                      pure_noise_schedule_steps=4000, batch_pure_noise=8, anchor_steps=200,
                      anchor_schedule_steps=2000, batch_anchor=12),
    "smoke": ChainScale(clips=24, vae_steps=3, image_steps=3, motion_steps=2, video_finetune_steps=1,
                        stage1_steps=2, stage2_steps=2, batch_images=4, batch_image_teacher=4, batch_videos=1,
                        vae_crop=32, check_prompts=1, check_steps=2, pure_noise_steps=1, pure_noise_schedule_steps=2,
                        batch_pure_noise=1, anchor_steps=1, anchor_schedule_steps=2, batch_anchor=2),
}

# Both distill stages' teacher guidance w ~ U[GUIDANCE_W] ((1 + w) cond - w uncond): past w = 3 the toy
# teacher's samples over-saturate (LCM's SD1.5 range is U[5, 15]).
GUIDANCE_W = (1.5, 3.0)
# Stage 1 distils towards an EMA target: from this v-prediction, zero-terminal-SNR teacher the online target's
# LoRA lost the prompt's colour.
STAGE1_TARGET = "ema"
# How much of the stage-1 LoRA stage 2 merges (model.lora_weight): the image LoRA pulls every frame towards its
# own sharp sample and away from the caption's track; half of it keeps colour and shape at 1 step.
STAGE2_LORA_WEIGHT = 0.5
# Stage 2's solver grid: 10 timesteps above STAGE2_FINE_BELOW, so the guided trajectory (and with it the direction
# word) reaches t = 999 in few links, and stage 1's 50-point grid below, whose fine links keep the shape.
STAGE2_DDIM_TIMESTEPS = 10
STAGE2_FINE_BELOW = 800
# Stage 2's guidance from t = STAGE2_HIGH_W_FROM up: the sampler's second prediction decides the direction again,
# and strong guidance there keeps it; near the data strong guidance over-saturates this teacher.
STAGE2_HIGH_W_FROM = 500
STAGE2_HIGH_W = (4.0, 7.0)
# The share of stage 2's solver steps that start from the target's own re-noised one-step x_0: the blurry input
# the few-step sampler's later steps see, which noised data never shows (it sharpens the shapes).
STAGE2_SAMPLER_INPUTS = 0.5
# The bundle's 4- and 8-step schedules (export default_timesteps), chosen on the eval's tune seeds: a second step
# at 699 keeps the first prediction's direction, which LCM's 799 re-decides.
DEFAULT_TIMESTEPS = {4: (999, 699, 399, 199), 8: (999, 699, 599, 499, 399, 299, 199, 99)}
IMAGE_FRAMES_PER_CLIP = 4  # stage 1's images: this many random frames of every clip


class Stage(Protocol):
    """A step of the chain. run(workdir, tick) -> its result (JSON); tick() -> the stage's seconds so far (a
    resumable stage calls it after every optimizer step). A teacher stage reports its training time alone."""

    name: str
    # A folder under WORKDIR that the stage resumes from (its checkpoints): removed before the stage reruns after
    # an earlier stage did, and where its chain_seconds.json lives.
    resumes_from: ClassVar[str | None]
    # False: run on every chain invocation (the export records this invocation's command).
    cached: ClassVar[bool]

    def run(self, workdir: Path, tick: Callable[[], float]) -> dict: ...


@dataclass(frozen=True)
class Context:
    arch: ToyArchitecture
    scale: ChainScale
    seed: int
    log: Log = field(compare=False)


@dataclass(frozen=True)
class Data:
    """Synthetic clips of the trained combinations (deterministic by seed): data/frames.npy + data/clips.json."""

    ctx: Context
    name: str = "data"
    resumes_from: ClassVar[str | None] = None
    cached: ClassVar[bool] = True

    def run(self, workdir: Path, tick) -> dict:
        clips = make_training_clips(self.ctx.scale.clips, self.ctx.arch, self.ctx.seed)
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        np.save(workdir / "data" / "frames.npy", np.stack([c.frames for c in clips]))
        (workdir / "data" / "clips.json").write_text(json.dumps([c.attributes() for c in clips]) + "\n")
        return {}


def _captions(workdir: Path) -> list[str]:
    return [clip["caption"] for clip in json.loads((workdir / "data" / "clips.json").read_text())]


@dataclass(frozen=True)
class Tokenizer:
    """A CLIP-format BPE on the captions: teacher/tokenizer."""

    ctx: Context
    name: str = "tokenizer"
    resumes_from: ClassVar[str | None] = None
    cached: ClassVar[bool] = True

    def run(self, workdir: Path, tick) -> dict:
        train_tokenizer(workdir / "teacher" / "tokenizer", _captions(workdir), self.ctx.arch)
        return {}


@dataclass(frozen=True)
class Vae:
    """An AutoencoderKL on the frames (teacher/vae), the clips encoded to latents/ (data.kind "latents")."""

    ctx: Context
    steps: int
    batch_size: int
    crop: int
    lr: float = 2e-3
    name: str = "vae"
    resumes_from: ClassVar[str | None] = None
    cached: ClassVar[bool] = True

    def run(self, workdir: Path, tick) -> dict:
        arch, seed = self.ctx.arch, self.ctx.seed
        torch.manual_seed(seed)
        frames = clip_frames(np.load(workdir / "data" / "frames.npy"))
        vae = build_vae(arch)
        train_vae(vae, frames.flatten(0, 1), steps=self.steps, batch_size=self.batch_size, lr=self.lr, seed=seed,
                  log=self.ctx.log, crop=self.crop)
        video_latents = encode_clips(vae, frames)
        elapsed = tick()
        check = check_vae(vae, arch, seed, self.ctx.log)
        vae.save_pretrained(workdir / "teacher" / "vae")
        write_latents(workdir / "latents", ((f"clip_{i:05d}.safetensors", latent, caption) for i, (latent, caption)
                                            in enumerate(zip(video_latents, _captions(workdir)))))
        # The image teacher's initial weights draw from torch's generator where the VAE's training left it; kept,
        # so a chain continued from here builds the same teacher as one run through.
        torch.save(torch.get_rng_state(), workdir / "teacher" / "rng_state.pt")
        _write_json(workdir / "teacher_check.json", {"vae": check})
        return {f"{self.name}_s": elapsed}


@dataclass(frozen=True)
class ImageTeacher:
    """The teacher image UNet and text encoder on every frame as an image: teacher/unet, text_encoder, scheduler.

    Every teacher stage trains towards Stable Target Field targets (the posterior mean over the clip's
    same-caption clips): where noise hides the clip, its caption's mean clip is what the words decide.
    """

    ctx: Context
    steps: int
    batch_size: int
    lr: float = 1e-3
    seed_offset: int = 1
    name: str = "teacher_image"
    resumes_from: ClassVar[str | None] = None
    cached: ClassVar[bool] = True

    def run(self, workdir: Path, tick) -> dict:
        from diffusers import AutoencoderKL
        from transformers import CLIPTokenizer

        arch, seed, teacher = self.ctx.arch, self.ctx.seed, workdir / "teacher"
        tokenizer = CLIPTokenizer.from_pretrained(teacher / "tokenizer")
        video_latents, captions = read_latents(workdir / "latents")
        ids, empty_ids = caption_ids(tokenizer, captions, arch), caption_ids(tokenizer, [""], arch)[0]
        torch.set_rng_state(torch.load(teacher / "rng_state.pt"))
        unet = build_unet(arch)
        text_encoder = build_text_encoder(arch, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
        image_latents = video_latents.permute(0, 2, 1, 3, 4).flatten(0, 1)  # every frame is an image
        frame_captions = [c for c in captions for _ in range(arch.num_frames)]
        train_image_teacher(unet, text_encoder, image_latents, ids.repeat_interleave(arch.num_frames, dim=0),
                            empty_ids, arch, steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                            seed=seed + self.seed_offset, log=self.ctx.log,
                            reference=same_caption_reference(frame_captions))
        elapsed = tick()
        vae = AutoencoderKL.from_pretrained(teacher / "vae").eval()
        check = check_teacher(vae, unet, text_encoder, tokenizer, empty_ids, arch, None,
                              prompts=self.ctx.scale.check_prompts, steps=self.ctx.scale.check_steps, seed=seed,
                              log=self.ctx.log)
        unet.save_pretrained(teacher / "unet")
        text_encoder.save_pretrained(teacher / "text_encoder")
        ddim_scheduler(arch).save_pretrained(teacher / "scheduler")
        _add_check(workdir, "image", check)
        return {f"{self.name}_s": elapsed}


@dataclass(frozen=True)
class VideoTeacher:
    """A video stage of the teacher (train_motion_teacher's settings): rewrites teacher/unet, teacher_motion and,
    where it trains it, teacher/text_encoder; records its check and direction_gain in teacher_check.json."""

    ctx: Context
    name: str
    check: str  # its key in teacher_check.json
    steps: int
    batch_size: int
    lr: float
    seed_offset: int
    new_motion_module: bool = False
    schedule_steps: int | None = None
    spatial: str = "cross_attention"
    train_text_encoder: bool = True
    min_timestep: int = 0
    high_noise_share: float = 1.0
    resumes_from: ClassVar[str | None] = None
    cached: ClassVar[bool] = True

    def run(self, workdir: Path, tick) -> dict:
        arch, seed, log = self.ctx.arch, self.ctx.seed, self.ctx.log
        parts = load_teacher(workdir, with_motion=not self.new_motion_module)
        unet, text_encoder, vae, tokenizer = parts["unet"], parts["text_encoder"], parts["vae"], parts["tokenizer"]
        ids, empty_ids = caption_ids(tokenizer, parts["captions"], arch), caption_ids(tokenizer, [""], arch)[0]
        if self.new_motion_module:
            torch.manual_seed(seed + self.seed_offset)  # its init: the same whether the chain resumed here or not
            adapter = build_motion_adapter(arch)
        else:
            adapter = parts["adapter"]
        train_motion_teacher(unet, adapter, text_encoder, parts["video_latents"], ids, empty_ids, arch,
                             steps=self.steps, batch_size=self.batch_size, lr=self.lr, seed=seed + self.seed_offset,
                             log=log, spatial=self.spatial, train_text_encoder=self.train_text_encoder,
                             min_timestep=self.min_timestep, schedule_steps=self.schedule_steps,
                             high_noise_share=self.high_noise_share,
                             reference=same_caption_reference(parts["captions"]))
        elapsed = tick()
        check = check_teacher(vae, unet, text_encoder, tokenizer, empty_ids, arch, adapter,
                              prompts=self.ctx.scale.check_prompts, steps=self.ctx.scale.check_steps, seed=seed,
                              log=log)
        check["direction_gain"] = direction_gain(unet, adapter, text_encoder, tokenizer, parts["video_latents"],
                                                 parts["captions"], arch, clips=min(24, len(parts["captions"])),
                                                 seed=seed)
        log(f"direction_gain after {self.name}: {check['direction_gain']:.4f}")
        save_teacher(workdir, unet, adapter, text_encoder if self.train_text_encoder else None)
        _add_check(workdir, self.check, check)
        return {f"{self.name}_s": elapsed}


@dataclass(frozen=True)
class Distill:
    """One stage of `lcm-edge distill` on the teachers: its config written to WORKDIR/NAME.json, then trained."""

    ctx: Context
    name: str
    config: dict = field(hash=False)
    image_latents: bool = False  # stage 1's data: IMAGE_FRAMES_PER_CLIP random frames of every clip
    cached: ClassVar[bool] = True

    @property
    def resumes_from(self) -> str:
        return self.name

    def run(self, workdir: Path, tick) -> dict:
        from ..config import load_config
        from ..train import train

        if self.image_latents:
            _write_image_latents(workdir, IMAGE_FRAMES_PER_CLIP, self.ctx.seed)
        path = workdir / f"{self.name}.json"
        path.write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")
        self.ctx.log(f"{self.name}: lcm-edge distill {self.config['stage']} --config {path}")
        train(load_config(path), callback=lambda *_: tick())
        return {}


@dataclass(frozen=True)
class Export:
    """The stage-2 model folder through the project's exporter (ONNX only: a few MB), with provenance."""

    bundle: Path
    provenance: dict = field(hash=False)
    timed: tuple[str, ...]  # the stages whose times the provenance records
    name: str = "export"
    resumes_from: ClassVar[str | None] = None
    cached: ClassVar[bool] = False

    def run(self, workdir: Path, tick) -> dict:
        from lcm_edge.export import export_bundle, load_diffusers_folder

        timings = {}
        for name in self.timed:
            timings.update(json.loads((workdir / "done" / f"{name}.json").read_text()))
        record = {**self.provenance, "timings_s": timings,
                  "teacher_check": json.loads((workdir / "teacher_check.json").read_text())}
        components = load_diffusers_folder(workdir / "stage2" / "model")
        source = portable({**components.source, "default_model": record}, {"WORKDIR": workdir, "OUT": self.bundle})
        report = export_bundle(self.bundle, **components.export_kwargs(), default_frames=16, default_fps=8,
                               provenance=source, overwrite=True, default_timesteps=DEFAULT_TIMESTEPS)
        return {"parity": report.summary()}


def distill_configs(workdir: Path, scale: ChainScale, arch: ToyArchitecture, seed: int) -> tuple[dict, dict]:
    """Stage 1 and stage 2 configs for the teachers in workdir, as a user would write them."""
    schedule = {"beta_schedule": "linear", "beta_start": arch.beta_start, "beta_end": arch.beta_end,
                "prediction_type": arch.prediction_type, "rescale_betas_zero_snr": arch.rescale_betas_zero_snr,
                "num_ddim_timesteps": 50}
    train = {"batch_size": scale.batch_images, "learning_rate": 1e-3, "lr_scheduler": "cosine",
             "lr_warmup_steps": 20, "checkpointing_steps": 200, "checkpoints_total_limit": 1, "resume": "auto",
             "report_to": "tensorboard", "log_every": 25, "adam_weight_decay": 0.0}
    data = {"kind": "latents", "resolution": arch.resolution}
    return two_stage_configs(
        workdir, pretrained=workdir / "teacher", motion_adapter=workdir / "teacher_motion", schedule=schedule,
        image_data={**data, "root": str(workdir / "image_latents")},
        video_data={**data, "root": str(workdir / "latents"), "num_frames": arch.num_frames}, train=train,
        consistency={"w_min": GUIDANCE_W[0], "w_max": GUIDANCE_W[1], "loss_type": "huber", "huber_c": 0.001},
        lora={"rank": 16, "alpha": 16.0},
        image={"train": {"max_train_steps": scale.stage1_steps, "seed": seed + 3},
               "consistency": {"target": STAGE1_TARGET}},  # "ema": the config's decay, 0.95
        video={"schedule": {"num_ddim_timesteps": STAGE2_DDIM_TIMESTEPS, "fine_ddim_timesteps": 50,
                            "fine_below": STAGE2_FINE_BELOW},
               # The student's temporal layers start from the teacher's, not zero: at toy compute this converges
               # in hundreds of steps.
               "model": {"lora_weight": STAGE2_LORA_WEIGHT, "student_motion_init": "teacher"},
               "train": {"batch_size": scale.batch_videos, "max_train_steps": scale.stage2_steps, "seed": seed + 4},
               "consistency": {"target": "ema", "ema_decay": 0.95, "high_w_from": STAGE2_HIGH_W_FROM,
                               "high_w_min": STAGE2_HIGH_W[0], "high_w_max": STAGE2_HIGH_W[1],
                               "sampler_inputs": STAGE2_SAMPLER_INPUTS}})


def recipe(workdir: Path, scale: ChainScale, arch: ToyArchitecture, seed: int, log: Log) -> list:
    """The chain's stages before export, in order."""
    ctx = Context(arch, scale, seed, log)
    stage1, stage2 = distill_configs(workdir, scale, arch, seed)
    return [
        Data(ctx),
        Tokenizer(ctx),
        Vae(ctx, steps=scale.vae_steps, batch_size=scale.batch_images, crop=scale.vae_crop),
        ImageTeacher(ctx, steps=scale.image_steps, batch_size=scale.batch_image_teacher),
        # A new motion module on the image teacher, its cross-attention and text encoder trained with it: in single
        # frames "left" and "right" look the same, only video teaches them apart.
        VideoTeacher(ctx, "teacher_motion", "video", steps=scale.motion_steps, batch_size=scale.batch_videos,
                     lr=1e-3, seed_offset=2, new_motion_module=True),
        # The same layers fine-tuned on the clips. The resnets stay frozen: training them at batch 2 costs the
        # image stage's shapes.
        VideoTeacher(ctx, "teacher_video_finetune", "video_finetuned", steps=scale.video_finetune_steps,
                     batch_size=scale.batch_videos, lr=3e-4, seed_offset=77),
        # The pure-noise end alone (t >= 990): the caption is all the model has there, and its stable target the
        # caption's mean clip, so this is where the direction word is learnt.
        VideoTeacher(ctx, "teacher_pure_noise", "video_pure_noise", steps=scale.pure_noise_steps,
                     batch_size=scale.batch_pure_noise, schedule_steps=scale.pure_noise_schedule_steps, lr=1e-3,
                     seed_offset=5, min_timestep=990),
        # The pure-noise stage continued with a third of each batch on every t: its weights serve every noise
        # level, and the pure-noise end alone costs the shapes.
        VideoTeacher(ctx, "teacher_anchor", "video_anchored", steps=scale.anchor_steps,
                     batch_size=scale.batch_anchor, schedule_steps=scale.anchor_schedule_steps, lr=1e-3,
                     seed_offset=6, min_timestep=990, high_noise_share=2 / 3),
        Distill(ctx, "stage1", stage1, image_latents=True),
        Distill(ctx, "stage2", stage2),
    ]


class _Clock:
    """A stage's seconds: those of its earlier, interrupted runs (kept in chain_seconds.json inside the folder it
    resumes from) plus this run's. tick() returns the total and, for a resumable stage, rewrites the file."""

    def __init__(self, path: Path | None):
        self.path = path
        self.earlier = json.loads(path.read_text())["seconds"] if path and path.is_file() else 0.0
        self.start = time.perf_counter()

    def tick(self) -> float:
        seconds = self.earlier + time.perf_counter() - self.start
        if self.path is not None:
            _write_json(self.path, {"seconds": seconds})
        return seconds


def run_recipe(stages: list, workdir: Path) -> dict:
    """Run the stages in order; returns each one's result (its marker).

    A finished stage leaves WORKDIR/done/NAME.json (its result, with NAME_s: its seconds) and is skipped next time.
    Once a stage runs, every later one runs too, since its inputs changed: the marker goes first (a stage that
    fails is rerun, never taken as done) and a resumable stage's folder is removed (its checkpoints would resume
    a model of the old inputs). A resumable stage continued after an interruption counts its earlier seconds.
    """
    results, ran = {}, False
    for stage in stages:
        marker = workdir / "done" / f"{stage.name}.json"
        if stage.cached and not ran and marker.is_file():
            results[stage.name] = json.loads(marker.read_text())
            continue
        marker.unlink(missing_ok=True)
        if ran and stage.resumes_from:
            shutil.rmtree(workdir / stage.resumes_from, ignore_errors=True)
        clock = _Clock(workdir / stage.resumes_from / "chain_seconds.json" if stage.resumes_from else None)
        result = stage.run(workdir, clock.tick)
        result = {f"{stage.name}_s": clock.tick(), **result}
        if stage.cached:
            _write_json(marker, result)
            ran = True
        results[stage.name] = result
    return results


def _write_json(path: Path, value) -> None:
    """Replaced whole: a stop mid-write leaves the previous file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value) + "\n")
    os.replace(tmp, path)


def _add_check(workdir: Path, name: str, check: dict) -> None:
    _write_json(workdir / "teacher_check.json", {**json.loads((workdir / "teacher_check.json").read_text()),
                                                 name: check})


def _write_image_latents(workdir: Path, per_clip: int, seed: int) -> None:
    """Stage 1 trains on images: `per_clip` random frames of every clip, each its own (C, h, w) sample."""
    video_latents, captions = read_latents(workdir / "latents")
    rng = np.random.default_rng(seed)
    samples = []
    for i, (latent, caption) in enumerate(zip(video_latents, captions)):
        for f in rng.choice(latent.shape[1], size=per_clip, replace=False):
            samples.append((f"frame_{i:05d}_{int(f):02d}.safetensors", latent[:, int(f)], caption))
    write_latents(workdir / "image_latents", samples)


def code_version() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return out.stdout.strip()


def portable(record, places: dict[str, Path]):
    """`record` with every path under one of `places` (name -> folder) written as NAME/relative: a shipped
    bundle names where its parts came from without carrying the builder's folders."""
    if isinstance(record, dict):
        return {key: portable(value, places) for key, value in record.items()}
    if isinstance(record, list):
        return [portable(value, places) for value in record]
    if isinstance(record, str):  # word by word, so a command line is rewritten too
        return " ".join(_portable_word(word, places) for word in record.split(" "))
    return record


def _portable_word(word: str, places: dict[str, Path]) -> str:
    for name, folder in places.items():
        for prefix in (str(folder.resolve()), str(folder).rstrip("/")):
            if word == prefix or word.startswith(prefix + "/"):
                return name + word[len(prefix):]
    return word


def _without_note(argv: list[str]) -> list[str]:
    """The command line with --note's text as NOTE: the note is recorded on its own, and changes no result."""
    return ["NOTE" if i and argv[i - 1] == "--note" else "--note=NOTE" if word.startswith("--note=") else word
            for i, word in enumerate(argv)]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--bundle", type=Path, required=True, help="where the exported bundle goes")
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--note", default=None,
                        help="recorded in the bundle's provenance (e.g. where a step ran, if not in this command)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    arch, scale = ToyArchitecture(), SCALES[args.scale]
    log = lambda message: print(message, flush=True)  # noqa: E731
    start = time.perf_counter()
    stages = recipe(args.workdir, scale, arch, args.seed, log)
    command = "python -m lcm_edge.distill.default_model.chain " + shlex.join(_without_note(argv or sys.argv[1:]))
    provenance = {"command": command, "seed": args.seed, "scale": asdict(scale), "architecture": asdict(arch),
                  "code_version": code_version(), "held_out": [list(c) for c in HELD_OUT],
                  "prompts": prompt_form(), "torch_threads": torch.get_num_threads(),
                  **({"note": args.note} if args.note else {})}
    stages.append(Export(args.bundle, provenance, tuple(stage.name for stage in stages)))
    results = run_recipe(stages, args.workdir)
    log(results["export"]["parity"])
    log(f"chain done in {time.perf_counter() - start:.0f} s this run; stages {json.dumps(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

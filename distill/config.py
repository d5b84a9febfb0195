"""Training configuration: frozen dataclasses read strictly from a JSON or TOML file.

One `DistillConfig` describes a whole run. It is written as `config.json` into the output folder and
beside every checkpoint, so a checkpoint always says how it was made, and a resumed run can check that
it continues the same experiment. Unknown keys, missing required keys and wrong types are errors
(`ConfigError` names the dotted key); nothing falls back silently.

    stage       "image" | "video" | "adapter"
    schedule    the teacher's noise schedule and the DDIM solver grid (no defaults for the betas)
    model       where the teacher / base weights come from
    data        the dataset
    train       optimisation, precision, checkpoints, logging
    lora        the LoRA trained in stage "image" (and by adapter kind "lora")
    consistency the consistency loss: target network, EMA, guidance range, Huber constant
    adapter     stage "adapter" only: what is adapted
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lcm_edge.scheduler import BETA_SCHEDULES, PREDICTION_TYPES

from .errors import ConfigError

STAGES = ("image", "video", "adapter")
DATA_KINDS = ("images", "videos", "latents")
TARGETS = ("online", "ema")
LOSS_TYPES = ("huber", "l2")
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
REPORT_TO = ("tensorboard", "none")
ADAPTER_KINDS = ("image_to_video", "lora")
MOTION_INITS = ("zero", "teacher")

# SD1.5 UNet layers the LCM-LoRA recipe adapts (docs/animatelcm.md, "Spatial LoRA").
DEFAULT_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)


@dataclass(frozen=True)
class ScheduleConfig:
    """The teacher's noise schedule and the DDIM solver grid of consistency distillation.

    The betas have no defaults: SD1.5 was trained with `scaled_linear`, AnimateDiff/AnimateLCM use
    `linear`, and a wrong guess trains a student for another model's noise levels.
    """

    beta_schedule: str
    beta_start: float
    beta_end: float
    prediction_type: str  # the teacher's parameterisation; the student inherits it
    num_train_timesteps: int = 1000
    # N: the solver runs on every k-th timestep, k = T // N (LCM's skipping-step schedule, §4.3).
    # It becomes `original_inference_steps` of the LCMScheduler that samples the student.
    num_ddim_timesteps: int = 50
    # Optional two-level grid: below timestep `fine_below` the solver runs on the finer grid of
    # `fine_ddim_timesteps` points instead (few links from pure noise, an accurate solve near the data).
    fine_ddim_timesteps: int | None = None
    fine_below: int = 0
    timestep_scaling: float = 10.0  # s = timestep_scaling * t in the boundary condition
    rescale_betas_zero_snr: bool = False

    def validate(self, key: str) -> None:
        _choice(f"{key}.beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _choice(f"{key}.prediction_type", self.prediction_type, PREDICTION_TYPES)
        _positive_int(f"{key}.num_train_timesteps", self.num_train_timesteps)
        _positive_int(f"{key}.num_ddim_timesteps", self.num_ddim_timesteps)
        if self.num_ddim_timesteps > self.num_train_timesteps:
            raise ConfigError(f"{key}.num_ddim_timesteps", f"{self.num_ddim_timesteps} exceeds num_train_timesteps "
                              f"{self.num_train_timesteps}", "use at most num_train_timesteps solver steps (LCM: 50)")
        if self.num_train_timesteps % self.num_ddim_timesteps:
            raise ConfigError(f"{key}.num_ddim_timesteps", f"{self.num_ddim_timesteps} does not divide "
                              f"num_train_timesteps {self.num_train_timesteps}",
                              "pick a divisor (50 or 100 for 1000) so every solver step skips the same k timesteps")
        if self.fine_ddim_timesteps is None:
            if self.fine_below:
                raise ConfigError(f"{key}.fine_below", f"{self.fine_below} is set without fine_ddim_timesteps",
                                  "set fine_ddim_timesteps too (e.g. 50), or drop fine_below")
        else:
            _positive_int(f"{key}.fine_ddim_timesteps", self.fine_ddim_timesteps)
            if (self.fine_ddim_timesteps % self.num_ddim_timesteps
                    or self.num_train_timesteps % self.fine_ddim_timesteps):
                raise ConfigError(f"{key}.fine_ddim_timesteps", f"{self.fine_ddim_timesteps} is not a multiple of "
                                  f"num_ddim_timesteps {self.num_ddim_timesteps} dividing num_train_timesteps "
                                  f"{self.num_train_timesteps}", "pick e.g. 50 with num_ddim_timesteps 10: every "
                                  "coarse point (a sampler timestep) must lie on the fine grid")
            if not 0 < self.fine_below <= self.num_train_timesteps:
                raise ConfigError(f"{key}.fine_below", f"{self.fine_below} is outside 1..{self.num_train_timesteps}",
                                  "give the timestep below which the fine grid is used, e.g. 500")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ConfigError(f"{key}.beta_start", f"betas {self.beta_start}..{self.beta_end} are not increasing "
                              "inside (0, 1)", "SD1.5/AnimateLCM use beta_start 0.00085, beta_end 0.012")
        _positive(f"{key}.timestep_scaling", self.timestep_scaling)

    def solver_grid(self):
        """The solver's timesteps, ascending (a torch tensor): uniform, or two-level with fine_ddim_timesteps."""
        from . import consistency as C

        if self.fine_ddim_timesteps is None:
            return C.solver_timesteps(self.num_train_timesteps, self.num_ddim_timesteps)
        return C.two_level_solver_timesteps(self.num_train_timesteps, self.num_ddim_timesteps,
                                            self.fine_ddim_timesteps, self.fine_below)

    def lcm_scheduler_config(self) -> dict:
        """diffusers LCMScheduler config that samples the distilled student (written beside its weights).

        Built by the runtime's SchedulerConfig, so training and runtime share one schema."""
        from lcm_edge.scheduler import SchedulerConfig

        return SchedulerConfig.from_dict({
            "num_train_timesteps": self.num_train_timesteps, "beta_start": self.beta_start,
            "beta_end": self.beta_end, "beta_schedule": self.beta_schedule,
            "original_inference_steps": self.num_ddim_timesteps, "prediction_type": self.prediction_type,
            "timestep_scaling": self.timestep_scaling, "rescale_betas_zero_snr": self.rescale_betas_zero_snr,
        }, source="distill schedule").to_dict()


@dataclass(frozen=True)
class ModelConfig:
    """Weights the run starts from. All paths are local folders/files; nothing is downloaded.

    pretrained      diffusers SD1.5-family folder: unet/ vae/ text_encoder/ tokenizer/
    motion_adapter  stage "video": the teacher's motion module (AnimateDiff, a diffusers MotionAdapter
                    folder); stage "adapter": the distilled motion module the adapter is trained on
    lora            stage "video": the stage-1 LoRA, merged into the online student only;
                    stage "adapter": the stage-1 LoRA, merged into the base before adapting
    """

    pretrained: str
    motion_adapter: str | None = None
    lora: str | None = None
    lora_weight: float = 1.0
    # Stage "video": "zero" adds fresh temporal layers whose output projections are zero (the paper);
    # "teacher" starts the student's temporal layers from a copy of the teacher's.
    student_motion_init: str = "zero"

    def validate(self, key: str) -> None:
        _nonempty(f"{key}.pretrained", self.pretrained)
        _choice(f"{key}.student_motion_init", self.student_motion_init, MOTION_INITS)
        _finite(f"{key}.lora_weight", self.lora_weight)


@dataclass(frozen=True)
class DataConfig:
    """The dataset (see distill/data.py for the folder layouts).

    images   root/ + captions file (CSV with columns file,caption or JSONL {"file", "caption"})
    videos   root/ + CSV (file,caption, or WebVid's videoid,name[,page_dir]); decoded with OpenCV
    latents  root/ + latents.jsonl written by `precompute_latents` (VAE latents, already scaled)
    """

    kind: str
    root: str
    captions: str | None = None  # file name inside root; default: captions.csv / latents.jsonl
    resolution: int = 512  # square crop side in pixels
    num_frames: int = 16
    frame_stride: int = 4  # take every frame_stride-th frame of the source video
    center_crop: bool = True  # False: random crop
    random_flip: bool = False
    empty_prompt_probability: float = 0.0  # replace captions by "" (keeps the unconditional mode alive)
    num_workers: int = 0

    def validate(self, key: str) -> None:
        _choice(f"{key}.kind", self.kind, DATA_KINDS)
        _nonempty(f"{key}.root", self.root)
        _positive_int(f"{key}.resolution", self.resolution)
        if self.resolution % 8:
            raise ConfigError(f"{key}.resolution", f"{self.resolution} is not a multiple of 8",
                              "use a multiple of 8 (the VAE downsamples by 8), e.g. 256 or 512")
        _positive_int(f"{key}.num_frames", self.num_frames)
        _positive_int(f"{key}.frame_stride", self.frame_stride)
        _probability(f"{key}.empty_prompt_probability", self.empty_prompt_probability)
        _nonnegative_int(f"{key}.num_workers", self.num_workers)

    @property
    def captions_file(self) -> str:
        if self.captions is not None:
            return self.captions
        return "latents.jsonl" if self.kind == "latents" else "captions.csv"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, precision, checkpoints and logging."""

    output_dir: str
    max_train_steps: int
    seed: int = 0
    batch_size: int = 1  # per process
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # "bf16" / "fp16": autocast + the teacher stored in that precision
    gradient_checkpointing: bool = False
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    # None: start fresh (an existing checkpoint in output_dir is an error); "latest": the newest
    # checkpoint, which must exist; "auto": the newest if any, else start fresh; or a checkpoint path.
    resume: str | None = None
    report_to: str = "tensorboard"
    log_every: int = 10
    vae_batch_size: int = 16  # images per VAE encoder call (frames are images)

    def validate(self, key: str) -> None:
        _nonempty(f"{key}.output_dir", self.output_dir)
        _positive_int(f"{key}.max_train_steps", self.max_train_steps)
        _nonnegative_int(f"{key}.seed", self.seed)
        _positive_int(f"{key}.batch_size", self.batch_size)
        _positive_int(f"{key}.gradient_accumulation_steps", self.gradient_accumulation_steps)
        _positive(f"{key}.learning_rate", self.learning_rate)
        _choice(f"{key}.lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _nonnegative_int(f"{key}.lr_warmup_steps", self.lr_warmup_steps)
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{key}.{name}", f"{value} is outside [0, 1)", "use e.g. 0.9 / 0.999")
        _nonnegative(f"{key}.adam_weight_decay", self.adam_weight_decay)
        _positive(f"{key}.adam_epsilon", self.adam_epsilon)
        _positive(f"{key}.max_grad_norm", self.max_grad_norm)
        _choice(f"{key}.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _positive_int(f"{key}.checkpointing_steps", self.checkpointing_steps)
        if self.checkpoints_total_limit is not None:
            _positive_int(f"{key}.checkpoints_total_limit", self.checkpoints_total_limit)
        _choice(f"{key}.report_to", self.report_to, REPORT_TO)
        _positive_int(f"{key}.log_every", self.log_every)
        _positive_int(f"{key}.vae_batch_size", self.vae_batch_size)
        if self.resume is not None:
            _nonempty(f"{key}.resume", self.resume)


@dataclass(frozen=True)
class LoraSpec:
    """A peft LoRA on the spatial UNet. Scale of the update = alpha / rank."""

    rank: int = 64
    alpha: float = 64.0
    target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS
    dropout: float = 0.0

    def validate(self, key: str) -> None:
        _positive_int(f"{key}.rank", self.rank)
        _positive(f"{key}.alpha", self.alpha)
        if not self.target_modules:
            raise ConfigError(f"{key}.target_modules", "is empty", "list module names such as to_q, to_k, conv1")
        _probability(f"{key}.dropout", self.dropout)


@dataclass(frozen=True)
class ConsistencyConfig:
    """The consistency loss.

    target   "online": the student itself under no_grad (LCM-LoRA); "ema": an EMA copy (LCM, stage 2,
             teacher-free training). None picks "online" for stage image and "ema" otherwise.
    w_min/w_max  the teacher's guidance w ~ U[w_min, w_max] in (1 + w) * cond - w * uncond.
             w_min = w_max = 0 skips the unconditional teacher pass.
    solver_substeps  guided teacher DDIM steps per solver step t_{n+k} -> t_n (LCM: 1). More keep a coarse grid
             (few links from noise to data) with a finer, more accurate teacher ODE solve, at one more teacher
             pass (two with guidance) per substep.
    high_w_from/high_w_min/high_w_max  optional: solver steps from t_{n+k} >= high_w_from draw w from
             [high_w_min, high_w_max] instead (strong guidance where a clip's layout and motion are decided,
             the usual range near the data where strong guidance oversaturates). 0: off.
    sampler_inputs  fraction of solver steps whose x_{t_{n+k}} re-noises the target model's one-step x_0 from pure
             noise instead of a data latent: the blurred input the few-step sampler's second and later steps see,
             which noised data alone never shows the student. 0: off.
    """

    target: str | None = None
    ema_decay: float = 0.95
    loss_type: str = "huber"
    huber_c: float = 0.001
    w_min: float = 5.0
    w_max: float = 15.0
    solver_substeps: int = 1
    high_w_from: int = 0
    high_w_min: float = 0.0
    high_w_max: float = 0.0
    sampler_inputs: float = 0.0

    def validate(self, key: str) -> None:
        if self.target is not None:
            _choice(f"{key}.target", self.target, TARGETS)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"{key}.ema_decay", f"{self.ema_decay} is outside [0, 1)",
                              "use e.g. 0.95 (LCM) or 0.999")
        _choice(f"{key}.loss_type", self.loss_type, LOSS_TYPES)
        _positive(f"{key}.huber_c", self.huber_c)
        _nonnegative(f"{key}.w_min", self.w_min)
        if self.w_max < self.w_min:
            raise ConfigError(f"{key}.w_max", f"{self.w_max} is below w_min {self.w_min}",
                              "set w_max >= w_min (LCM-LoRA: 5 and 15)")
        _positive_int(f"{key}.solver_substeps", self.solver_substeps)
        _nonnegative_int(f"{key}.high_w_from", self.high_w_from)
        if self.high_w_from:
            _nonnegative(f"{key}.high_w_min", self.high_w_min)
            if self.high_w_max < self.high_w_min:
                raise ConfigError(f"{key}.high_w_max", f"{self.high_w_max} is below high_w_min {self.high_w_min}",
                                  "set high_w_max >= high_w_min")
        elif self.high_w_min or self.high_w_max:
            raise ConfigError(f"{key}.high_w_from", "is 0 (off) while high_w_min/high_w_max are set",
                              "set high_w_from to the timestep the high range starts at, or drop high_w_min/max")
        _probability(f"{key}.sampler_inputs", self.sampler_inputs)

    def w_range(self) -> tuple[float, float]:
        """The lowest and highest guidance any solver step draws."""
        if not self.high_w_from:
            return self.w_min, self.w_max
        return min(self.w_min, self.high_w_min), max(self.w_max, self.high_w_max)


@dataclass(frozen=True)
class AdapterConfig:
    """Stage "adapter": teacher-free consistency training of an adapter on a distilled model.

    image_to_video  a first-frame encoder trained from scratch whose zero-initialised outputs are added to
                    the UNet's down-block features (the ControlNet injection points); optionally a LoRA too
    lora            a LoRA fine-tune of the distilled model on new data
    """

    kind: str
    hidden_channels: int = 64
    condition_dropout: float = 0.1  # drop the image condition so the model keeps a text-only mode
    train_lora: bool = False  # image_to_video: also train a spatial LoRA (config.lora)

    def validate(self, key: str) -> None:
        _choice(f"{key}.kind", self.kind, ADAPTER_KINDS)
        _positive_int(f"{key}.hidden_channels", self.hidden_channels)
        _probability(f"{key}.condition_dropout", self.condition_dropout)


@dataclass(frozen=True)
class DistillConfig:
    stage: str
    schedule: ScheduleConfig
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    lora: LoraSpec = field(default_factory=LoraSpec)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    adapter: AdapterConfig | None = None

    def __post_init__(self) -> None:
        _choice("stage", self.stage, STAGES)
        if self.consistency.target is None:  # the stage's default, written out so saved configs state it
            default = "online" if self.stage == "image" else "ema"
            object.__setattr__(self, "consistency", dataclasses.replace(self.consistency, target=default))
        self.schedule.validate("schedule")
        self.model.validate("model")
        self.data.validate("data")
        self.train.validate("train")
        self.lora.validate("lora")
        self.consistency.validate("consistency")
        if self.consistency.high_w_from >= self.schedule.num_train_timesteps:
            raise ConfigError("consistency.high_w_from", f"{self.consistency.high_w_from} is outside "
                              f"1..{self.schedule.num_train_timesteps - 1}",
                              "use a timestep below schedule.num_train_timesteps, or 0 for off")
        if self.adapter is not None:
            self.adapter.validate("adapter")
        self._check_stage()

    def _check_stage(self) -> None:
        s = self.stage
        if s == "image":
            if self.data.kind == "videos":
                raise ConfigError("data.kind", "stage image trains on images, got videos",
                                  "use data.kind 'images' or 'latents' (4-D image latents)")
            for key in ("motion_adapter", "lora"):
                if getattr(self.model, key) is not None:
                    raise ConfigError(f"model.{key}", "is not used by stage image", f"remove model.{key}")
        if s == "video":
            if self.model.motion_adapter is None:
                raise ConfigError("model.motion_adapter", "stage video needs the teacher's motion module",
                                  "point it at an AnimateDiff MotionAdapter folder")
            if self.model.lora is None:
                raise ConfigError("model.lora", "stage video needs the stage-1 LoRA",
                                  "run `distill image` first and point model.lora at its lora/ folder")
            if self.data.kind == "images":
                raise ConfigError("data.kind", "stage video trains on videos, got images",
                                  "use data.kind 'videos' or 'latents' (5-D video latents)")
            if self.consistency.target == "online":
                raise ConfigError("consistency.target", "stage video needs an EMA target: the stage-1 LoRA is "
                                  "merged into the online model only and reaches the target through the EMA",
                                  "set consistency.target to 'ema' (or leave it out)")
        if s == "adapter":
            if self.adapter is None:
                raise ConfigError("adapter", "stage adapter needs an [adapter] section",
                                  "add adapter.kind: 'image_to_video' or 'lora'")
            if self.adapter.kind == "image_to_video":
                if self.model.motion_adapter is None:
                    raise ConfigError("model.motion_adapter", "image_to_video needs the distilled motion module",
                                      "point it at the motion_adapter/ folder written by `distill video`")
                if self.data.kind == "images":
                    raise ConfigError("data.kind", "image_to_video trains on videos",
                                      "use data.kind 'videos' or 'latents' (5-D video latents)")
            if self.consistency.target == "online":
                raise ConfigError("consistency.target", "teacher-free consistency training needs an EMA target",
                                  "set consistency.target to 'ema' (or leave it out)")
        elif self.adapter is not None:
            raise ConfigError("adapter", f"is only used by stage adapter, not {s}", "remove the adapter section")

    @property
    def target(self) -> str:
        """The consistency target network ("online" or "ema"), the stage's default resolved."""
        return self.consistency.target

    @property
    def is_video(self) -> bool:
        return self.model.motion_adapter is not None and self.stage in ("video", "adapter")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora"]["target_modules"] = list(self.lora.target_modules)
        return d

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    def replace(self, **sections: Any) -> DistillConfig:
        """A copy with whole sections or section fields replaced: replace(train={"max_train_steps": 4})."""
        d = self.to_dict()
        for name, value in sections.items():
            if name not in d:
                raise ConfigError(name, "is not a config section", f"use one of {sorted(d)}")
            if isinstance(value, Mapping) and isinstance(d[name], dict):
                d[name].update(value)
            else:
                d[name] = value
        return config_from_dict(d)


# ----------------------------------------------------------------------------------------------
# Reading


def load_config(path: str | Path, *, stage: str | None = None) -> DistillConfig:
    """Read a config file (.json or .toml). `stage` (from the command line) must match the file's, if any."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", f"{path} does not exist", "pass the path of a .json or .toml config file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid JSON ({exc})", "fix the file") from exc
    elif path.suffix == ".toml":
        toml = _toml_module()
        try:
            raw = toml.loads(text)
        except toml.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid TOML ({exc})", "fix the file") from exc
    else:
        raise ConfigError("--config", f"{path} has suffix {path.suffix!r}", "use a .json or .toml file")
    if not isinstance(raw, dict):
        raise ConfigError("--config", f"{path} holds a {type(raw).__name__}, not a table/object",
                          "write the config as one JSON object or TOML document")
    if stage is not None:
        if "stage" in raw and raw["stage"] != stage:
            raise ConfigError("stage", f"the file says {raw['stage']!r} but the command is `distill {stage}`",
                              f"run `distill {raw['stage']}` or change stage in {path}")
        raw = {**raw, "stage": stage}
    return config_from_dict(raw)


def two_stage_configs(run_dir: str | Path, *, pretrained: str | Path, motion_adapter: str | Path,
                      schedule: Mapping[str, Any], image_data: Mapping[str, Any], video_data: Mapping[str, Any],
                      train: Mapping[str, Any] | None = None, consistency: Mapping[str, Any] | None = None,
                      lora: Mapping[str, Any] | None = None, image: Mapping[str, Mapping[str, Any]] | None = None,
                      video: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[dict, dict]:
    """The decoupled recipe's two configs, as a user writes them (config_from_dict / load_config read them).

    Stage 1 ("image") trains the consistency LoRA on `pretrained` into RUN_DIR/stage1; stage 2 ("video")
    distils the video teacher (`pretrained` + `motion_adapter`) into RUN_DIR/stage2 with stage 1's LoRA
    (RUN_DIR/stage1/lora) merged. `schedule`, `train` and `consistency` are both stages'; `lora` is stage 1's
    LoRA shape. `image` and `video` add to or override one stage's sections, key by key within a section
    (e.g. video={"schedule": {"num_ddim_timesteps": 10}}).
    """
    run_dir = Path(run_dir)
    stage1 = {"stage": "image", "schedule": dict(schedule), "model": {"pretrained": str(pretrained)},
              "data": dict(image_data), "train": {**(train or {}), "output_dir": str(run_dir / "stage1")},
              **({"lora": dict(lora)} if lora else {}), "consistency": dict(consistency or {})}
    stage2 = {"stage": "video", "schedule": dict(schedule),
              "model": {"pretrained": str(pretrained), "motion_adapter": str(motion_adapter),
                        "lora": str(run_dir / "stage1" / "lora")},
              "data": dict(video_data), "train": {**(train or {}), "output_dir": str(run_dir / "stage2")},
              "consistency": dict(consistency or {})}
    for config, overrides in ((stage1, image), (stage2, video)):
        for section, values in (overrides or {}).items():
            config[section] = {**config.get(section, {}), **values}
    return stage1, stage2


def _toml_module():
    """tomllib (Python 3.11+), or its backport tomli on 3.10 (lcm-edge[distill] installs it there)."""
    try:
        import tomllib
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError as exc:
            raise ConfigError("--config", "reading TOML on Python < 3.11 needs the tomli package",
                              "pip install tomli, or write the config as JSON") from exc
    return tomllib


def config_from_dict(raw: Mapping[str, Any]) -> DistillConfig:
    return _build(DistillConfig, raw, "")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix or "config"
    if not isinstance(raw, Mapping):
        raise ConfigError(where, f"expected a table/object, got {type(raw).__name__}", f"write {where} as a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(str(k) for k in raw if k not in fields)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}", f"unknown key(s) {unknown} in {where}",
                          f"remove them; {where} accepts {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(key, "is required", f"add {key} to the config file")
            continue
        kwargs[name] = _convert(hints[name], raw[name], key)
    return cls(**kwargs)


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}", f"write {key} as a list")
        return tuple(_convert(args[0], v, key) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}", f"write {key} = true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}", f"write {key} as a whole number")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}", f"write {key} as a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}", f"write {key} as a quoted string")
        return value
    raise TypeError(f"config field {key} has unsupported type {hint!r}")  # a bug in this file, not user input


# ----------------------------------------------------------------------------------------------
# Field checks


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, f"{value!r} is not supported", f"use one of {list(allowed)}")


def _positive_int(key: str, value: int) -> None:
    if value < 1:
        raise ConfigError(key, f"{value} is not positive", "use an integer >= 1")


def _nonnegative_int(key: str, value: int) -> None:
    if value < 0:
        raise ConfigError(key, f"{value} is negative", "use an integer >= 0")


def _finite(key: str, value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(key, f"{value} is not finite", "use a finite number")


def _positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(key, f"{value} is not a finite number > 0", "use a positive number")


def _nonnegative(key: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(key, f"{value} is not a finite number >= 0", "use a number >= 0")


def _probability(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(key, f"{value} is outside [0, 1]", "use a probability between 0 and 1")


def _nonempty(key: str, value: str) -> None:
    if not value.strip():
        raise ConfigError(key, "is empty", f"set {key}")

"""Every stage of lcm_edge.distill on tiny real diffusers models, a few CPU steps each.

One tiny SD-style base (random weights, saved as a diffusers folder) and a synthetic shapes dataset are
shared by the module; stage 1 runs once and its LoRA feeds stage 2 and the adapter stages, as in a real run.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from lcm_edge.distill import consistency as C
from lcm_edge.distill.config import ScheduleConfig, config_from_dict
from lcm_edge.distill.errors import CheckpointError, ConfigError
from lcm_edge.distill.models import Denoiser, EMATarget, load_base, save_base, zero_motion_outputs_
from lcm_edge.distill.synthetic import synthetic_clips, write_image_dataset, write_video_dataset
from lcm_edge.distill.train import build_stage, train
from tiny_sd import tiny_components  # benchmarks/: the distill benchmarks' tiny model

SCHEDULE = {"beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon",
            "num_ddim_timesteps": 50}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    base = tiny_components(root / "tokenizer")
    with torch.no_grad():  # a motion module that acts, so teacher != inflated image model
        for name, p in base.motion_adapter.named_parameters():
            if "proj_out" in name:
                p.normal_(0.0, 0.2)
    save_base(base, root / "base", ScheduleConfig(**SCHEDULE))
    clips = synthetic_clips(6, seed=0, size=16, num_frames=6)
    write_video_dataset(root / "videos", clips)
    write_image_dataset(root / "images", clips)
    return root


def make_config(workspace, stage, name, **sections):
    root = workspace
    d = {
        "stage": stage,
        "schedule": dict(SCHEDULE),
        "model": {"pretrained": str(root / "base")},
        "data": {"kind": "images", "root": str(root / "images"), "resolution": 16},
        "train": {"output_dir": str(root / name), "max_train_steps": 3, "batch_size": 2, "checkpointing_steps": 2,
                  "log_every": 1, "report_to": "none", "seed": 0},
        "lora": {"rank": 4, "alpha": 4.0},
        "consistency": {"w_min": 2.0, "w_max": 6.0},
    }
    if stage != "image":
        d["data"] = {"kind": "videos", "root": str(root / "videos"), "resolution": 16, "num_frames": 4,
                     "frame_stride": 1}
    for key, value in sections.items():
        d[key] = {**d.get(key, {}), **value} if isinstance(value, dict) else value
    return config_from_dict(d)


def params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.fixture(scope="module")
def stage1(workspace):
    """Stage 1 with an EMA target (the LCM-LoRA default, online target, runs in the resume test)."""
    cfg = make_config(workspace, "image", "stage1", consistency={"target": "ema"})
    base = load_base(cfg.model, need_vae=True)
    teacher_before = params(base.unet)
    result = train(cfg, base=base)
    return cfg, result, teacher_before


def test_stage1_image_distillation(stage1, workspace):
    cfg, result, teacher_before = stage1
    assert result.global_step == 3 and sorted(result.losses) == [1, 2, 3]
    assert all(math.isfinite(v) and v > 0 for v in result.losses.values())
    stage = result.stage
    # The teacher is never trained: bit-identical to the weights it was loaded with.
    for name, p in stage.teacher.unet.named_parameters():
        assert torch.equal(p, teacher_before[name]), name
    # In the student only LoRA weights moved; the base layers under them are bit-identical.
    lora_moved = False
    for name, p in stage.online.unet.named_parameters():
        if "lora_" in name:
            lora_moved |= "lora_B" in name and bool(p.abs().sum() > 0)  # B starts at zero
        else:
            assert torch.equal(p, teacher_before[name.replace(".base_layer", "")]), name
    assert lora_moved
    # Artifacts: both LoRA layouts, the LCM scheduler config for the runtime, config beside the checkpoints.
    lora = result.artifacts["lora"]
    assert (lora / "pytorch_lora_weights.safetensors").is_file() and (lora / "lora_kohya.safetensors").is_file()
    scheduler = json.loads(result.artifacts["scheduler"].read_text())
    assert scheduler["_class_name"] == "LCMScheduler" and scheduler["original_inference_steps"] == 50
    ckpts = sorted(p.name for p in (result.output_dir / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-2", "checkpoint-3"]
    for ck in ckpts:
        saved = json.loads((result.output_dir / "checkpoints" / ck / "config.json").read_text())
        assert saved == cfg.to_dict()
    log = [json.loads(line) for line in (result.output_dir / "losses.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3]


def test_saved_lora_fuses_through_exporter_and_diffusers_like_peft_merge(stage1):
    """Both saved layouts, fused by the exporter's loader and by diffusers, give peft's own merge."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    from lcm_edge.export.lora import fuse_loras, load_lora
    from lcm_edge.distill.lora_io import unet_probe

    cfg, result, teacher_before = stage1
    online = result.stage.online.unet
    reference = copy.deepcopy(online)
    for module in reference.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    expected = {k.replace(".base_layer", ""): v for k, v in reference.state_dict().items() if "lora_" not in k}
    fresh = UNet2DConditionModel.from_pretrained(f"{cfg.model.pretrained}/unet")
    lora_dir = result.artifacts["lora"]
    for name in ("lora_kohya.safetensors", "pytorch_lora_weights.safetensors"):
        unet = copy.deepcopy(fresh)
        loaded = load_lora(lora_dir / name, {"unet": unet})
        assert len(loaded.layers) == result.stage.info["lora_layers"]
        report = fuse_loras({"unet": unet}, [loaded], {"unet": unet_probe})
        assert report.checks[0].passed and report.checks[0].effect_max_abs > 0
        for key, value in unet.state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7, msg=f"{name}: {key}")

        sd, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(lora_dir / name), return_lora_metadata=True)
        unet = copy.deepcopy(fresh)
        StableDiffusionPipeline.load_lora_into_unet(sd, alphas, unet, adapter_name="lcm", metadata=metadata)
        unet.fuse_lora()
        fused = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
        for key, value in expected.items():
            torch.testing.assert_close(fused[key], value, rtol=1e-6, atol=1e-7, msg=f"diffusers {name}: {key}")


def test_kohya_keys_follow_the_documented_layout(stage1):
    from safetensors.torch import load_file

    _, result, _ = stage1
    keys = load_file(str(result.artifacts["lora"] / "lora_kohya.safetensors"))
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{q}.lora_down.weight", f"{q}.lora_up.weight", f"{q}.alpha"} <= set(keys)
    assert keys[f"{q}.alpha"].item() == 4.0 and keys[f"{q}.lora_down.weight"].shape[0] == 4
    conv = [k for k in keys if k.endswith("resnets_0_conv1.lora_down.weight")]
    assert conv and keys[conv[0]].ndim == 4  # conv LoRA: down [r, in, k, k]
    assert keys[conv[0].replace("lora_down", "lora_up")].shape[2:] == (1, 1)


@pytest.fixture(scope="module")
def stage2(workspace, stage1):
    cfg = make_config(workspace, "video", "stage2",
                      model={"motion_adapter": str(workspace / "base" / "motion_adapter"),
                             "lora": str(stage1[1].artifacts["lora"])},
                      consistency={"ema_decay": 0.5, "w_min": 1.0, "w_max": 1.0})
    return cfg, train(cfg)


def test_stage2_target_starts_without_lora_and_takes_it_up_at_the_ema_rate(workspace, stage1, stage2):
    cfg, result = stage2
    # Step 0: build the stage as train() does and compare online and target.
    base = load_base(cfg.model, need_vae=True)
    unmerged = params(base.unet)
    stage0 = build_stage(cfg, base)
    online0, target0 = params(stage0.online), params(stage0.ema.target)
    lora_touched = [n for n in online0 if not torch.equal(online0[n], target0[n])]
    assert lora_touched and not any("motion_modules" in n for n in lora_touched)
    for n in lora_touched:  # the target holds the pre-LoRA weights, the online model the merged ones
        assert torch.equal(target0[n], unmerged[n.removeprefix("unet.")])
    # The student's temporal layers start as the identity: zero output projections.
    proj_out = [n for n in online0 if "motion_modules" in n and "proj_out" in n]
    assert proj_out and all(not online0[n].any() for n in proj_out)
    assert zero_motion_outputs_(copy.deepcopy(stage0.online)) == len(proj_out) // 2

    # After K = 3 steps of EMA with decay mu, a frozen LoRA'd weight has |target - online| = mu^K |target_0 - online|.
    K, mu = result.global_step, cfg.consistency.ema_decay
    online, target = params(result.stage.online), params(result.stage.ema.target)
    for n in lora_touched:
        assert torch.equal(online[n], online0[n]), n  # frozen in the online model
        before = (target0[n] - online0[n]).norm()
        after = (target[n] - online[n]).norm()
        assert after / before == pytest.approx(mu**K, rel=1e-3), n
    # Frozen, non-LoRA spatial weights are bit-identical in online, target and the original.
    for n in online0:
        if n not in lora_touched and "motion_modules" not in n:
            assert torch.equal(online[n], online0[n]) and torch.equal(target[n], target0[n]), n
    # Only the temporal layers trained.
    moved = [n for n in online if not torch.equal(online[n], online0[n])]
    assert moved and all("motion_modules" in n for n in moved)
    assert all(math.isfinite(v) for v in result.losses.values())


def test_stage2_artifacts_load_and_teacher_is_untouched(stage2):
    from diffusers import MotionAdapter, UNetMotionModel

    from lcm_edge.export import load_diffusers_folder

    cfg, result = stage2
    teacher_motion = MotionAdapter.from_pretrained(cfg.model.motion_adapter)
    teacher_unet = result.stage.teacher.unet
    for name, p in teacher_motion.named_parameters():
        assert torch.equal(dict(teacher_unet.named_parameters())[name].float(), p), name
    adapter = MotionAdapter.from_pretrained(result.artifacts["motion_adapter"])
    online = dict(result.stage.online.unet.named_parameters())
    for name, p in adapter.named_parameters():
        assert torch.equal(p, online[name]), name
    # The export-ready folder: what `lcm-edge export` reads.
    components = load_diffusers_folder(result.artifacts["model"])
    assert isinstance(components.unet, UNetMotionModel)
    assert components.scheduler_config.original_inference_steps == cfg.schedule.num_ddim_timesteps
    for name, p in components.unet.named_parameters():
        assert torch.equal(p, online[name]), name


def test_adapter_image_to_video_teacher_free(workspace, stage1, stage2):
    """Adapter trained from scratch on the distilled video model; gradient accumulation and checkpointing on."""
    cfg = make_config(workspace, "adapter", "i2v",
                      adapter={"kind": "image_to_video", "hidden_channels": 8, "condition_dropout": 0.5},
                      model={"motion_adapter": str(stage2[1].artifacts["motion_adapter"]),
                             "lora": str(stage1[1].artifacts["lora"])},
                      train={"gradient_accumulation_steps": 2, "gradient_checkpointing": True, "batch_size": 1})
    base = load_base(cfg.model, need_vae=True)
    stage0 = build_stage(cfg, copy.deepcopy(base))
    # Zero-initialised outputs: the untrained adapter leaves the distilled video model unchanged.
    x = torch.randn(1, 4, 4, 8, 8)
    t = torch.tensor([499])
    text = torch.randn(1, 77, 32)
    with torch.no_grad():
        with_adapter = stage0.online(x, t, text, torch.randn(1, 4, 8, 8))
        without = Denoiser(stage0.online.unet)(x, t, text)
    torch.testing.assert_close(with_adapter, without, rtol=0, atol=0)
    before = params(stage0.online.unet)

    result = train(cfg, base=base)
    assert all(math.isfinite(v) for v in result.losses.values())
    after = params(result.stage.online.unet)
    for n in before:
        assert torch.equal(before[n], after[n]), n  # the video model is frozen; only the adapter trains
    assert any(p.abs().sum() > 0 for n, p in result.stage.online.image_adapter.named_parameters() if "skips" in n)
    from lcm_edge.distill.models import FirstFrameAdapter

    reloaded = FirstFrameAdapter.from_pretrained(result.artifacts["i2v_adapter"])
    for n, p in reloaded.named_parameters():
        assert torch.equal(p, dict(result.stage.online.image_adapter.named_parameters())[n])


def test_adapter_lora_finetune_of_distilled_model(workspace, stage1, stage2):
    cfg = make_config(workspace, "adapter", "adapter_lora", adapter={"kind": "lora"},
                      model={"motion_adapter": str(stage2[1].artifacts["motion_adapter"]),
                             "lora": str(stage1[1].artifacts["lora"])},
                      train={"max_train_steps": 2})
    result = train(cfg)
    assert all(math.isfinite(v) for v in result.losses.values())
    names = [n for n, p in result.stage.online.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and "motion_modules" not in n for n in names)
    assert (result.artifacts["lora"] / "lora_kohya.safetensors").is_file()
    assert (result.artifacts["lora_ema"] / "pytorch_lora_weights.safetensors").is_file()


def test_interrupted_and_resumed_run_repeats_the_uninterrupted_losses(workspace):
    """LCM-LoRA recipe (online target), v-prediction, cosine LR with warm-up: 4 steps, checkpoint every 2."""
    overrides = dict(schedule={"prediction_type": "v_prediction"},
                     train={"max_train_steps": 4, "lr_scheduler": "cosine", "lr_warmup_steps": 1,
                            "learning_rate": 1e-3})
    full = train(make_config(workspace, "image", "resume_full", **overrides))

    cfg = make_config(workspace, "image", "resume_cut", **overrides)

    def stop_at_3(step, loss):
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, callback=stop_at_3)
    cfg_out = workspace / "resume_cut" / "checkpoints"
    ckpts = sorted(p.name for p in cfg_out.iterdir())
    assert ckpts == ["checkpoint-2"]  # step 3 was never checkpointed: it is the step that is lost

    # Starting over in a folder that holds a checkpoint is refused; resuming with other settings too.
    with pytest.raises(ConfigError, match="train.resume"):
        train(cfg)
    changed = cfg.replace(train={"resume": "latest", "learning_rate": 5e-4})
    with pytest.raises(ConfigError, match="train.learning_rate"):
        train(changed)

    # A checkpoint written before a setting existed resumes as if it held the setting's default.
    saved = cfg_out / "checkpoint-2" / "config.json"
    older = json.loads(saved.read_text())
    del older["schedule"]["fine_below"], older["schedule"]["fine_ddim_timesteps"]
    del older["consistency"]["solver_substeps"]
    saved.write_text(json.dumps(older))

    # The interrupted run logged step 3, which the checkpoint does not hold: the resumed run logs it once.
    log_path = workspace / "resume_cut" / "losses.jsonl"
    assert [json.loads(line)["step"] for line in log_path.read_text().splitlines()] == [1, 2, 3]
    with log_path.open("a") as f:  # and a kill in the middle of writing step 4's line
        f.write('{"step": 4, "lo')
    resumed = train(cfg.replace(train={"resume": "latest"}))
    assert sorted(resumed.losses) == [3, 4]
    logged = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4]
    assert logged[2]["loss"] == pytest.approx(full.losses[3], rel=1e-6, abs=1e-9)
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-6, abs=1e-9), step
    assert sorted(p.name for p in cfg_out.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    for n, p in resumed.stage.online.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, dict(full.stage.online.named_parameters())[n], rtol=1e-6, atol=1e-8)
    with pytest.raises(CheckpointError):
        train(cfg.replace(train={"resume": str(workspace / "nowhere")}))


def test_ema_target_tracks_only_what_can_differ():
    online = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    target = copy.deepcopy(online)
    online[0].weight.requires_grad_(False)
    online[0].bias.requires_grad_(False)
    with torch.no_grad():
        online[0].bias.add_(1.0)  # a frozen weight that differs (a merged LoRA)
    ema = EMATarget(target, online, decay=0.9)
    assert ema.names == ["0.bias", "1.weight", "1.bias"]
    before = target[0].weight.clone()
    for _ in range(5):
        ema.update(online)
    assert torch.equal(target[0].weight, before)
    torch.testing.assert_close(target[0].bias - online[0].bias, (before.new_tensor(-1.0) * 0.9**5).expand(2))
    with pytest.raises(CheckpointError):
        ema.load_state_dict({"0.bias": torch.zeros(2)}, "test")


def test_image_stage_rejects_video_settings(workspace):
    with pytest.raises(ConfigError, match="model.motion_adapter"):
        make_config(workspace, "image", "x", model={"motion_adapter": "m"})
    with pytest.raises(ConfigError, match="model.lora"):
        make_config(workspace, "video", "x", model={"motion_adapter": "m"})
    with pytest.raises(ConfigError, match="consistency.target"):
        make_config(workspace, "video", "x", model={"motion_adapter": "m", "lora": "l"},
                    consistency={"target": "online"})


def test_consistency_function_is_identity_at_the_boundary():
    acp = C.make_alphas_cumprod("linear", 0.00085, 0.012, 1000)
    x = torch.randn(2, 4, 3, 4, 4)
    out = C.consistency_function(torch.randn_like(x), x, torch.tensor([0, 0]), acp, "epsilon")
    torch.testing.assert_close(out, x, rtol=0, atol=0)


def test_command_line_entry_point_bf16_toml(workspace):
    """`python -m lcm_edge.distill image --config FILE.toml` in a fresh process: bf16 autocast, v-prediction."""
    import os
    import subprocess
    import sys

    out = workspace / "cli_run"
    config = workspace / "cli.toml"
    config.write_text(f"""
[schedule]
beta_schedule = "scaled_linear"
beta_start = 0.00085
beta_end = 0.012
prediction_type = "v_prediction"

[model]
pretrained = "{workspace / 'base'}"

[data]
kind = "images"
root = "{workspace / 'images'}"
resolution = 16

[train]
output_dir = "{out}"
max_train_steps = 5
batch_size = 2
mixed_precision = "bf16"
report_to = "tensorboard"
log_every = 1

[lora]
rank = 4
alpha = 2.0
""", encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "lcm_edge.distill", "image", "--config", str(config),
                          "--max-train-steps", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done: 2 steps" in run.stdout
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["max_train_steps"] == 2 and saved["stage"] == "image"
    assert saved["train"]["mixed_precision"] == "bf16"
    log = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(math.isfinite(e["loss"]) for e in log)
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (out / "lora" / "lora_kohya.safetensors").is_file()
    # A second start in the same folder is refused with the fix, exit code 2.
    again = subprocess.run([sys.executable, "-m", "lcm_edge.distill", "image", "--config", str(config)],
                           capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 2 and "train.resume" in again.stderr


def test_add_distill_parser_registers_the_three_stages(tmp_path):
    import argparse

    from lcm_edge.distill.cli import add_distill_parser, cmd_distill

    parser = argparse.ArgumentParser(prog="lcm-edge")
    add_distill_parser(parser.add_subparsers(dest="command", required=True))
    for stage in ("image", "video", "adapter"):
        args = parser.parse_args(["distill", stage, "--config", str(tmp_path / "c.json"), "--resume", "latest"])
        assert args.stage == stage and args.func is cmd_distill and args.resume == "latest"
    with pytest.raises(SystemExit):
        parser.parse_args(["distill", "audio", "--config", "x"])
    with pytest.raises(ConfigError, match="does not exist"):
        cmd_distill(parser.parse_args(["distill", "image", "--config", str(tmp_path / "c.json")]))


def test_two_process_data_parallel_run_resumes_exactly(workspace):
    """DDP over two CPU processes (torchrun + gloo, what `accelerate launch` sets up on GPUs): sharded data,
    reduced loss, checkpoints written once with both processes' RNG states, and an exact resume."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}

    def launch(name, *extra):
        cfg = make_config(workspace, "image", name, train={"max_train_steps": 4, "batch_size": 1,
                                                           "gradient_accumulation_steps": 2})
        path = workspace / f"{name}.json"
        cfg.save(path)
        # Own session, so a hang kills torchrun's workers too, not only torchrun.
        proc = subprocess.Popen([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "lcm_edge.distill",
                                 "image", "--config", str(path), *extra], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
        assert stdout.count("done:") == 1  # reported by the main process only
        out = workspace / name
        return out, [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]

    full_dir, full = launch("ddp_full")
    assert [e["step"] for e in full] == [1, 2, 3, 4]
    ckpt = full_dir / "checkpoints" / "checkpoint-2"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    _, first = launch("ddp_cut", "--max-train-steps", "2")
    _, resumed = launch("ddp_cut", "--resume", "latest")
    assert [e["step"] for e in resumed] == [1, 2, 3, 4]  # the log continues
    for a, b in zip(full, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), (a, b)


class _PointDenoiser(torch.nn.Module):
    """The exact eps-denoiser of data that is a single point x0*: eps = (x - sqrt(a) x0*) / sqrt(1 - a).

    Its PF-ODE is solved exactly by one DDIM step of any length, so every substep count must land on the same
    x_prev. Records the timesteps it is called at."""

    def __init__(self, point, acp, shift=0.0):
        super().__init__()
        self.point, self.acp, self.shift, self.calls = point, acp, shift, []

    def forward(self, x, t, text):
        self.calls.append(t.tolist())
        a = C.append_dims(self.acp[t], x.ndim)
        point = self.point.repeat(x.shape[0] // self.point.shape[0], 1, 1, 1)  # guided: cond and uncond batches
        point = point + self.shift * (1.0 - a)  # shift != 0: an x_0 estimate that drifts with the noise level
        return (x - a.sqrt() * point) / (1.0 - a).sqrt()


def test_solver_substeps_split_the_teacher_solve(workspace):
    from types import SimpleNamespace

    from lcm_edge.distill.train import Stage, distillation_loss

    def x_prev_of(substeps, shift):
        cfg = make_config(workspace, "image", "substeps", schedule={"num_ddim_timesteps": 10},
                          consistency={"solver_substeps": substeps, "w_min": 2.0, "w_max": 2.0, "target": "ema"})
        acp = C.make_alphas_cumprod("linear", 0.00085, 0.012, 1000)
        point = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
        teacher = _PointDenoiser(point, acp, shift)
        seen = []

        class Target(torch.nn.Module):
            def forward(self, x, t, text):
                seen.append(x.clone())
                return torch.zeros_like(x)

        stage = Stage(online=_PointDenoiser(point, acp), teacher=teacher, ema=SimpleNamespace(target=Target()),
                      uncond_embeds=torch.zeros((1, 3, 8)))
        distillation_loss(stage, point, torch.zeros((2, 3, 8)), acp, cfg, torch.Generator().manual_seed(0))
        return seen[0], teacher.calls

    one, calls_one = x_prev_of(1, 0.0)
    three, calls_three = x_prev_of(3, 0.0)
    torch.testing.assert_close(three, one, rtol=1e-4, atol=1e-5)  # exact solver: the substeps agree
    # Three teacher calls per solver step, at t_{n+k}, t_{n+k} - k/3, t_{n+k} - 2k/3 (k = 100).
    assert len(calls_one) == 1 and len(calls_three) == 3
    start = calls_three[0][0]
    assert calls_one[0][0] == start and [c[0] for c in calls_three] == [start, start - 33, start - 66]
    # A teacher whose x_0 estimate drifts with the noise level: the finer solve lands elsewhere.
    drift_one, _ = x_prev_of(1, 0.5)
    drift_three, _ = x_prev_of(3, 0.5)
    assert (drift_three - drift_one).abs().max() > 1e-3


def test_solver_substeps_must_be_positive(workspace):
    with pytest.raises(ConfigError, match="consistency.solver_substeps"):
        make_config(workspace, "image", "x", consistency={"solver_substeps": 0})


def test_two_level_grid_drives_the_distillation_steps(workspace):
    """schedule.fine_ddim_timesteps / fine_below reach the loss: the teacher solves from t_{n+k} and the target
    reads t_n one grid link lower, 20 timesteps below the boundary and 100 above it."""
    from types import SimpleNamespace

    from lcm_edge.distill.train import Stage, distillation_loss

    cfg = make_config(workspace, "image", "two_level",
                      schedule={"num_ddim_timesteps": 10, "fine_ddim_timesteps": 50, "fine_below": 500},
                      consistency={"w_min": 2.0, "w_max": 2.0, "target": "ema"})
    acp = C.make_alphas_cumprod("linear", 0.00085, 0.012, 1000)
    point = torch.randn((8, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    links = set()

    online = _PointDenoiser(point, acp)  # called at t_{n+k}

    class Target(torch.nn.Module):  # called at t_n
        def forward(self, x, t, text):
            links.update(zip(online.calls[-1], t.tolist()))
            return torch.zeros_like(x)

    for seed in range(8):
        stage = Stage(online=online, teacher=_PointDenoiser(point, acp), ema=SimpleNamespace(target=Target()),
                      uncond_embeds=torch.zeros((1, 3, 8)))
        distillation_loss(stage, point, torch.zeros((8, 3, 8)), acp, cfg, torch.Generator().manual_seed(seed))
    grid = cfg.schedule.solver_grid().tolist()
    assert links and all(start in grid and end == ([0] + grid)[grid.index(start)] for start, end in links)
    assert {start - end for start, end in links if start < 500} <= {19, 20}  # 19: the first link, 19 -> 0
    assert {start - end for start, end in links if start >= 600} == {100}
    assert any(start < 500 for start, _ in links) and any(start >= 600 for start, _ in links)


def test_high_guidance_range_from_a_timestep(workspace):
    """consistency.high_w_from: solver steps from t_{n+k} >= it draw w from the high range, the rest from
    [w_min, w_max]; off, the draws are the plain range's, number for number."""
    from lcm_edge.distill.train import _draw_guidance

    t_start = torch.tensor([999, 799, 599, 499, 299, 19])
    plain = make_config(workspace, "image", "plain", consistency={"w_min": 1.5, "w_max": 3.0})
    high = make_config(workspace, "image", "high", consistency={"w_min": 1.5, "w_max": 3.0, "high_w_from": 500,
                                                                "high_w_min": 4.0, "high_w_max": 6.0})
    w_plain = _draw_guidance(plain.consistency, t_start, torch.Generator().manual_seed(3))
    w_high = _draw_guidance(high.consistency, t_start, torch.Generator().manual_seed(3))
    u = torch.rand((6,), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(w_plain, 1.5 + 1.5 * u)
    torch.testing.assert_close(w_high, torch.where(t_start >= 500, 4.0 + 2.0 * u, 1.5 + 1.5 * u))
    assert high.consistency.w_range() == (1.5, 6.0) and plain.consistency.w_range() == (1.5, 3.0)


def test_sampler_inputs_replace_data_by_the_targets_one_step_prediction(workspace):
    """consistency.sampler_inputs: that fraction of a batch's x_0 becomes the target model's consistency output at
    the last timestep from pure noise (what the few-step sampler's first step hands on); the rest stays data."""
    from types import SimpleNamespace

    from lcm_edge.distill.train import Stage, _with_sampler_inputs

    cfg = make_config(workspace, "image", "sampler_inputs", consistency={"target": "ema", "sampler_inputs": 0.5})
    s = cfg.schedule
    acp = C.make_alphas_cumprod("linear", 0.00085, 0.012, 1000)
    calls = []

    class Target(torch.nn.Module):
        def forward(self, x, t, text):
            calls.append((x.clone(), t.clone()))
            return 0.1 * x + 0.3

    x0 = torch.randn((64, 4, 8, 8), generator=torch.Generator().manual_seed(1)) + 5.0
    stage = Stage(online=None, teacher=None, ema=SimpleNamespace(target=Target()))
    mixed = _with_sampler_inputs(stage, x0, torch.zeros((64, 3, 8)), acp, cfg, torch.Generator().manual_seed(0))
    x_last, t_last = calls[0]
    assert (t_last == 999).all()
    # Pure noise at the last timestep: nothing of the data reaches the target's input.
    _with_sampler_inputs(stage, -x0, torch.zeros((64, 3, 8)), acp, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(calls[1][0], x_last, rtol=0, atol=1e-6)
    assert abs(x_last.mean().item()) < 0.05 and abs(x_last.std().item() - 1.0) < 0.05
    first = C.consistency_function(0.1 * x_last + 0.3, x_last, t_last, acp, s.prediction_type, s.timestep_scaling)
    kept = (mixed == x0).flatten(1).all(1)
    replaced = torch.isclose(mixed, first).flatten(1).all(1)
    assert bool((kept ^ replaced).all()) and 16 <= int(kept.sum()) <= 48


@pytest.mark.parametrize("consistency,key", [
    ({"sampler_inputs": 1.5}, "consistency.sampler_inputs"),
    ({"high_w_min": 4.0, "high_w_max": 6.0}, "consistency.high_w_from"),
    ({"high_w_from": 500, "high_w_min": 6.0, "high_w_max": 4.0}, "consistency.high_w_max"),
    ({"high_w_from": 1000, "high_w_min": 4.0, "high_w_max": 6.0}, "consistency.high_w_from"),
])
def test_high_guidance_range_errors_name_the_key(workspace, consistency, key):
    with pytest.raises(ConfigError) as info:
        make_config(workspace, "image", "x", consistency=consistency)
    assert info.value.argument == key

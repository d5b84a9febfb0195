"""Datasets, the resumable sampler, synthetic shapes and the training config reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lcm_edge.distill.config import DataConfig, config_from_dict, load_config
from lcm_edge.distill.data import (LatentDataset, MediaDataset, StepSampler, precompute_latents, read_records,
                                   read_video_frames, resize_and_crop)
from lcm_edge.distill.errors import ConfigError, DatasetError
from lcm_edge.distill.synthetic import (DIRECTIONS, latents_to_rgb, pixel_latents, synthetic_clips, write_image_dataset,
                                        write_pixel_latents, write_video_dataset)
from lcm_edge.errors import InvalidArgumentError


@pytest.fixture(scope="module")
def clips():
    return synthetic_clips(5, seed=3, size=24, num_frames=9)


# ----------------------------------------------------------------------------------------------
# Synthetic shapes


def test_synthetic_clips_are_deterministic_and_keep_ground_truth(clips):
    again = synthetic_clips(5, seed=3, size=24, num_frames=9)
    for a, b in zip(clips, again):
        assert a.caption == b.caption and np.array_equal(a.frames, b.frames)
    assert not np.array_equal(synthetic_clips(1, seed=4, size=24, num_frames=9)[0].frames, clips[0].frames)
    for clip in clips:
        assert clip.caption == f"a {clip.colour} {clip.shape} moving {clip.direction}"
        # The shape's colour centroid moves the way the caption says.
        mask = np.abs(clip.frames.astype(int) - 40).sum(-1) > 60
        ys, xs = np.nonzero(mask[0])
        ye, xe = np.nonzero(mask[-1])
        dx, dy = DIRECTIONS[clip.direction]
        moved = np.array([xe.mean() - xs.mean(), ye.mean() - ys.mean()])
        assert np.dot(moved, (dx, dy)) > 2.0, clip.caption
        centres = clip.attributes()["centres"]
        assert len(centres) == 9 and all(0 < c < 24 for xy in centres for c in xy)


def test_travel_sets_the_path_length_and_keeps_the_shape_in_frame():
    for travel in ((0.12, 0.2), (0.3, 0.45)):
        for clip in synthetic_clips(24, seed=8, size=64, num_frames=16, travel=travel):
            centres = np.asarray(clip.centres())
            length = np.abs(centres[-1] - centres[0]).max() / 64
            assert travel[0] <= length <= travel[1], (travel, length)
            assert (centres - clip.radius >= 0).all() and (centres + clip.radius <= 64).all(), clip.caption
    for bad in ((0.0, 0.1), (0.3, 0.2), (0.5, 0.7)):
        with pytest.raises(InvalidArgumentError, match="travel"):
            synthetic_clips(1, seed=0, size=64, travel=bad)


def test_pixel_latents_round_trip(clips):
    lat = pixel_latents(clips[0].frames, 12)
    assert lat.shape == (4, 9, 12, 12) and lat.dtype == np.float32 and -1 <= lat.min() and lat.max() <= 1
    rgb = latents_to_rgb(lat)
    assert rgb.shape == (9, 12, 12, 3)
    assert np.abs(rgb.astype(int) - clips[0].frames[:, ::2, ::2].astype(int)).mean() < 20


# ----------------------------------------------------------------------------------------------
# Datasets


def test_video_dataset_decodes_with_stride_crop_and_flip(tmp_path, clips):
    write_video_dataset(tmp_path, clips)
    cfg = DataConfig(kind="videos", root=str(tmp_path), resolution=16, num_frames=3, frame_stride=4,
                     center_crop=False, random_flip=True)
    ds = MediaDataset(cfg)
    item = ds[(0, 123)]
    assert item["pixels"].shape == (3, 3, 16, 16) and item["caption"] == clips[0].caption
    assert -1.0 <= item["pixels"].min() and item["pixels"].max() <= 1.0
    assert torch.equal(ds[(0, 123)]["pixels"], item["pixels"])  # the draw seed fixes crop, flip, start
    # Frame stride: frames 0, 4, 8 of the clip (the clip has 9, so the start must be 0).
    frames = read_video_frames(tmp_path / "clip_00000.mp4", 3, 4, np.random.default_rng(0))
    decoded = read_video_frames(tmp_path / "clip_00000.mp4", 9, 1, None)
    assert np.array_equal(frames, decoded[[0, 4, 8]])
    assert np.abs(decoded.astype(int) - clips[0].frames.astype(int)).mean() < 8  # mp4v is lossy
    # Too short for the stride: the largest stride that fits; fewer frames than asked: an error.
    assert np.array_equal(read_video_frames(tmp_path / "clip_00000.mp4", 3, 10, None), decoded[[0, 4, 8]])
    with pytest.raises(DatasetError, match="fewer than data.num_frames"):
        read_video_frames(tmp_path / "clip_00000.mp4", 10, 1, None)


def test_webvid_csv_and_jsonl_captions(tmp_path, clips):
    write_video_dataset(tmp_path / "00001", clips[:2])
    (tmp_path / "00001" / "clip_00000.mp4").rename(tmp_path / "00001" / "1234.mp4")
    (tmp_path / "webvid.csv").write_text("videoid,contentUrl,duration,page_dir,name\n"
                                         "1234,http://x,PT00H00M09S,00001,a red thing\n", encoding="utf-8")
    records = read_records(tmp_path, "webvid.csv", "videos")
    assert [(r.file, r.caption) for r in records] == [("00001/1234.mp4", "a red thing")]
    write_image_dataset(tmp_path / "img", clips[:2])
    (tmp_path / "img" / "captions.jsonl").write_text(
        json.dumps({"file": "image_00000.png", "text": "hello"}) + "\n", encoding="utf-8")
    assert read_records(tmp_path / "img", "captions.jsonl", "images")[0].caption == "hello"
    item = MediaDataset(DataConfig(kind="images", root=str(tmp_path / "img"), resolution=16,
                                   captions="captions.jsonl"))[(0, 0)]
    assert item["pixels"].shape == (3, 16, 16)


def test_dataset_errors_name_the_file_and_fix(tmp_path, clips):
    write_image_dataset(tmp_path, clips[:1])
    (tmp_path / "bad.csv").write_text("path,text\na.png,x\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="columns file,caption"):
        read_records(tmp_path, "bad.csv", "images")
    (tmp_path / "missing.csv").write_text("file,caption\nnope.png,x\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="do not exist"):
        read_records(tmp_path, "missing.csv", "images")
    with pytest.raises(DatasetError, match="captions file not found"):
        read_records(tmp_path, "none.csv", "images")


def test_resize_and_crop_center():
    frames = np.zeros((1, 20, 40, 3), np.uint8)
    frames[:, :, 18:22] = 255  # a bright vertical bar in the middle
    out = resize_and_crop(frames, 10, None)
    assert out.shape == (1, 3, 10, 10)
    assert out[0, 0, :, 4:6].mean() > 0.5 and out[0, 0, :, 0].max() == -1.0


def test_latents_folder_and_precompute(tmp_path, clips):
    from diffusers import AutoencoderKL

    write_pixel_latents(tmp_path / "lat", clips, 8)
    ds = LatentDataset(DataConfig(kind="latents", root=str(tmp_path / "lat"), num_frames=4))
    item = ds[(1, 7)]
    assert item["latents"].shape == (4, 4, 8, 8) and item["caption"] == clips[1].caption
    write_pixel_latents(tmp_path / "lat_img", clips[:1], 8, images=True)
    assert len(LatentDataset(DataConfig(kind="latents", root=str(tmp_path / "lat_img")))) == 9

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, layers_per_block=1, latent_channels=4,
                        scaling_factor=0.5)
    write_video_dataset(tmp_path / "vid", clips[:2])
    cfg = DataConfig(kind="videos", root=str(tmp_path / "vid"), resolution=16, num_frames=4, frame_stride=2)
    out = precompute_latents(cfg, vae, tmp_path / "pre", batch_size=3)
    pre = LatentDataset(DataConfig(kind="latents", root=str(out), num_frames=4))
    lat = pre[(0, 0)]["latents"]
    assert lat.shape == (4, 4, 16, 16)
    pixels = MediaDataset(cfg)[(0, int(np.random.SeedSequence([0, 0]).generate_state(1)[0]))]["pixels"]
    with torch.no_grad():
        expect = vae.encode(pixels).latent_dist.mean * 0.5
    torch.testing.assert_close(lat, expect.permute(1, 0, 2, 3))


def test_step_sampler_resumes_mid_stream_and_shards_disjointly():
    full = StepSampler(7, 2, seed=1)
    stream = [x for _, x in zip(range(40), iter(full))]
    resumed = StepSampler(7, 2, seed=1, start_microbatch=5)
    assert [x for _, x in zip(range(30), iter(resumed))] == stream[10:]
    # Every epoch is a permutation: each index once per 7 draws.
    assert sorted(i for i, _ in stream[:7]) == list(range(7)) == sorted(i for i, _ in stream[7:14])
    # Two processes: together they draw the single-process stream, interleaved by micro-batch.
    r0 = [x for _, x in zip(range(8), iter(StepSampler(7, 2, seed=1, rank=0, world_size=2)))]
    r1 = [x for _, x in zip(range(8), iter(StepSampler(7, 2, seed=1, rank=1, world_size=2)))]
    assert r0[:2] + r1[:2] + r0[2:4] + r1[2:4] == stream[:8]
    assert len({seed for _, seed in stream}) == len(stream)


# ----------------------------------------------------------------------------------------------
# Config


MINIMAL = {
    "stage": "image",
    "schedule": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                 "prediction_type": "epsilon"},
    "model": {"pretrained": "sd15"},
    "data": {"kind": "images", "root": "data"},
    "train": {"output_dir": "out", "max_train_steps": 10},
}


def test_config_json_and_toml_agree_and_round_trip(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(MINIMAL), encoding="utf-8")
    (tmp_path / "c.toml").write_text(
        'stage = "image"\n[schedule]\nbeta_schedule = "scaled_linear"\nbeta_start = 0.00085\nbeta_end = 0.012\n'
        'prediction_type = "epsilon"\n[model]\npretrained = "sd15"\n[data]\nkind = "images"\nroot = "data"\n'
        '[train]\noutput_dir = "out"\nmax_train_steps = 10\n', encoding="utf-8")
    a, b = load_config(tmp_path / "c.json"), load_config(tmp_path / "c.toml", stage="image")
    assert a == b and a.target == "online" and a.lora.rank == 64
    assert config_from_dict(a.to_dict()) == a
    saved = a.save(tmp_path / "saved.json")
    assert load_config(saved) == a
    assert a.replace(train={"max_train_steps": 3}).train.max_train_steps == 3


@pytest.mark.parametrize("mutate,key", [
    (lambda d: d["train"].update(batchsize=2), "train.batchsize"),
    (lambda d: d["schedule"].pop("beta_schedule"), "schedule.beta_schedule"),
    (lambda d: d["train"].update(max_train_steps="10"), "train.max_train_steps"),
    (lambda d: d["train"].update(max_train_steps=0), "train.max_train_steps"),
    (lambda d: d["schedule"].update(num_ddim_timesteps=30), "schedule.num_ddim_timesteps"),
    (lambda d: d["schedule"].update(fine_below=500), "schedule.fine_below"),
    (lambda d: d["schedule"].update(num_ddim_timesteps=10, fine_ddim_timesteps=25, fine_below=500),
     "schedule.fine_ddim_timesteps"),
    (lambda d: d["schedule"].update(num_ddim_timesteps=10, fine_ddim_timesteps=50, fine_below=0),
     "schedule.fine_below"),
    (lambda d: d["consistency"].update(w_min=3.0, w_max=1.0), "consistency.w_max"),
    (lambda d: d["data"].update(resolution=20), "data.resolution"),
    (lambda d: d["train"].update(mixed_precision="fp8"), "train.mixed_precision"),
    (lambda d: d.update(stage="audio"), "stage"),
    (lambda d: d.update(adapter={"kind": "lora"}), "adapter"),
])
def test_config_errors_name_the_key(mutate, key):
    d = json.loads(json.dumps({**MINIMAL, "consistency": {}}))
    mutate(d)
    with pytest.raises(ConfigError) as info:
        config_from_dict(d)
    assert info.value.argument == key
    assert "Fix:" in str(info.value)


def test_config_stage_must_match_the_command(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(MINIMAL), encoding="utf-8")
    with pytest.raises(ConfigError, match="distill video"):
        load_config(tmp_path / "c.json", stage="video")
    (tmp_path / "c.yaml").write_text("x: 1", encoding="utf-8")
    with pytest.raises(ConfigError, match="json or .toml"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("name,stage", [("stage1_image.toml", "image"), ("stage2_video.toml", "video"),
                                        ("adapter_i2v.toml", "adapter")])
def test_example_configs_parse(name, stage):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "distill" / "examples" / name
    cfg = load_config(path, stage=stage)
    assert cfg.stage == stage and cfg.train.mixed_precision == "bf16"


def test_the_two_stage_examples_are_the_config_builders_output():
    """distill/examples/stage1_image.toml and stage2_video.toml are what config.two_stage_configs writes for SD1.5
    + AnimateDiff (the files keep their comments for users; this keeps them one recipe)."""
    import tomllib
    from pathlib import Path

    from lcm_edge.distill.config import two_stage_configs

    folder = Path(__file__).resolve().parents[1] / "distill" / "examples"
    train = {"batch_size": 1, "learning_rate": 1e-4, "mixed_precision": "bf16", "gradient_checkpointing": True,
             "checkpointing_steps": 500, "checkpoints_total_limit": 3, "resume": "auto"}
    stage1, stage2 = two_stage_configs(
        "runs", pretrained="/models/stable-diffusion-v1-5", motion_adapter="/models/animatediff-motion-adapter-v1-5-2",
        schedule={"beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon",
                  "num_ddim_timesteps": 50},
        image_data={"kind": "images", "root": "/data/laion-aesthetic-subset", "resolution": 512, "center_crop": False},
        video_data={"kind": "videos", "root": "/data/webvid", "resolution": 512, "num_frames": 16, "frame_stride": 4,
                    "center_crop": False},
        train=train, consistency={"w_min": 5.0, "w_max": 15.0}, lora={"rank": 64, "alpha": 64.0},
        image={"train": {"max_train_steps": 4000, "batch_size": 8},
               "consistency": {"target": "online", "loss_type": "huber", "huber_c": 0.001}},
        video={"model": {"student_motion_init": "zero"},
               "train": {"max_train_steps": 10000, "gradient_accumulation_steps": 4, "vae_batch_size": 8},
               "consistency": {"target": "ema", "ema_decay": 0.95}})
    for name, built in (("stage1_image.toml", stage1), ("stage2_video.toml", stage2)):
        assert tomllib.loads((folder / name).read_text()) == built, name
        config_from_dict(built)  # and the loader takes it


def test_cli_module_imports_without_torch():
    """`lcm-edge` registers `distill` through distill.cli; that must not pull torch into the runtime CLI."""
    import subprocess
    import sys

    code = ("import sys, argparse, lcm_edge.distill.cli as c; p = argparse.ArgumentParser(); "
            "c.add_distill_parser(p.add_subparsers()); print('torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"

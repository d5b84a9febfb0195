"""The default-model chain's own pieces: caption tokenizer, clip detector, and the whole chain at smoke scale."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lcm_edge.distill.default_model.bpe import train_bpe, write_tokenizer
from lcm_edge.distill.default_model.clips import HELD_OUT, training_combinations
from lcm_edge.distill.default_model.detector import detect
from lcm_edge.distill.synthetic import COLOURS, DIRECTIONS, SHAPES, caption_for, synthetic_clips
from lcm_edge.tokenizer import CLIPTokenizer as RuntimeTokenizer

# The chain's --threads sets torch's process-wide thread count; this restores it after the module.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTIONS = [caption_for(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]


def test_caption_bpe_matches_transformers_and_is_deterministic(tmp_path):
    from transformers import CLIPTokenizer

    vocab, merges = train_bpe(CAPTIONS)
    assert (vocab, merges) == train_bpe(list(reversed(CAPTIONS)))
    folder = write_tokenizer(tmp_path / "tok", vocab, merges, max_length=16)
    ours, theirs = RuntimeTokenizer.from_folder(folder), CLIPTokenizer.from_pretrained(folder)
    prompts = CAPTIONS + ["A PURPLE hexagon moving sideways!", "", "red red red red red red red red red red red red red"]
    mismatched = [p for p in prompts if ours.encode(p).input_ids.tolist()
                  != theirs(p, padding="max_length", max_length=16, truncation=True).input_ids]
    assert mismatched == []
    # Every caption word is one token: the text encoder sees words, not spellings.
    assert all(len(ours.tokenize(c)) == len(c.split()) for c in CAPTIONS)


def test_held_out_combinations_are_real_and_excluded():
    combos = training_combinations()
    assert len(combos) == len(COLOURS) * len(SHAPES) * len(DIRECTIONS) - len(HELD_OUT)
    assert all(h not in combos and h[0] in COLOURS and h[1] in SHAPES and h[2] in DIRECTIONS for h in HELD_OUT)


def test_detector_reads_ground_truth_clips():
    clips = synthetic_clips(60, seed=3, size=64, num_frames=16)
    wrong = [(c.caption, detect(c.frames)) for c in clips
             if not all(detect(c.frames).matches(c.colour, c.shape, c.direction).values())]
    assert wrong == []


def test_detector_refuses_what_is_not_there():
    rng = np.random.default_rng(0)
    still = synthetic_clips(1, seed=1, size=64, num_frames=16)[0].frames[:1].repeat(16, axis=0)
    assert detect(still).direction is None  # an object that does not move has no direction
    blank = np.full((16, 64, 64, 3), 40, np.uint8)
    assert detect(blank).colour is None and detect(blank).present_fraction == 0.0
    noise = rng.integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)
    assert not all(detect(noise).matches("red", "circle", "right").values())


def test_chain_smoke_scale_builds_a_bundle_that_generates(tmp_path):
    """The identical chain (data -> tokenizer -> VAE -> teachers -> stage 1 -> stage 2 -> export) at smoke scale."""
    from lcm_edge import AnimateLCMPipeline, load_bundle
    from lcm_edge.distill.default_model.chain import DEFAULT_TIMESTEPS, STAGE2_DDIM_TIMESTEPS, main

    bundle = tmp_path / "bundle"
    assert main([str(tmp_path / "work"), "--bundle", str(bundle), "--scale", "smoke", "--threads", "1"]) == 0
    loaded = load_bundle(bundle)
    record = loaded.provenance["source"]["default_model"]
    assert record["seed"] == 0 and record["scale"]["stage2_steps"] == 2 and "stage2_s" in record["timings_s"]
    assert all(f"teacher_{step}_s" in record["timings_s"] for step in ("image", "motion", "pure_noise", "anchor"))
    assert all(check in record["teacher_check"] for check in ("vae", "image", "video", "video_pure_noise",
                                                              "video_anchored"))
    # The builder's folders stay out of the shipped provenance (paths read WORKDIR/..., OUT).
    assert str(tmp_path) not in json.dumps(loaded.provenance)
    assert record["command"].endswith("chain WORKDIR --bundle OUT --scale smoke --threads 1")
    assert loaded.model.default_frames == 16 and loaded.model.default_height == 64
    assert loaded.scheduler_config.beta_schedule == "linear"
    assert loaded.scheduler_config.original_inference_steps == STAGE2_DDIM_TIMESTEPS
    assert loaded.model.default_timesteps == {str(n): t for n, t in DEFAULT_TIMESTEPS.items()}
    result = AnimateLCMPipeline.from_bundle(bundle)("a red circle moving right", seed=1)
    assert result.frames.shape == (16, 64, 64, 3) and result.timesteps == DEFAULT_TIMESTEPS[4]
    # Resuming a finished chain re-exports from the markers without training again.
    assert main([str(tmp_path / "work"), "--bundle", str(bundle), "--scale", "smoke", "--threads", "1"]) == 0


def test_a_schedule_shorter_than_its_run_is_refused():
    import torch

    from lcm_edge.distill.default_model.pretrain import _optimise
    from lcm_edge.errors import InvalidArgumentError

    weight = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(InvalidArgumentError, match="schedule_steps"):
        _optimise("t", [weight], lambda _: weight.square().sum(), steps=4, lr=0.1, weight_decay=0.0, warmup=1,
                  log=lambda _: None, schedule_steps=2)
    # A longer schedule stopped early: the lr is still high at the last step, so the weight moves further.
    short, long_ = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    _optimise("t", [short], lambda _: short.square().sum(), steps=4, lr=0.1, weight_decay=0.0, warmup=1,
              log=lambda _: None)
    _optimise("t", [long_], lambda _: long_.square().sum(), steps=4, lr=0.1, weight_decay=0.0, warmup=1,
              log=lambda _: None, schedule_steps=40)
    assert float(long_.detach()[0]) < float(short.detach()[0]) < 1.0


def test_architecture_schedule_reaches_the_teacher_sampler_and_the_distill_configs(tmp_path):
    """prediction_type / zero terminal SNR are set once, on ToyArchitecture, and every schedule follows it."""
    from lcm_edge.distill.default_model.chain import SCALES, distill_configs
    from lcm_edge.distill.default_model.pretrain import ToyArchitecture, alphas_cumprod, ddim_scheduler

    plain = ToyArchitecture(prediction_type="epsilon", rescale_betas_zero_snr=False)
    sampler = ddim_scheduler(plain).config  # AnimateLCM's: what v1-v4's teachers were trained with
    assert (sampler.prediction_type, sampler.rescale_betas_zero_snr, sampler.steps_offset) == ("epsilon", False, 1)
    assert float(alphas_cumprod(plain)[-1]) > 1e-3

    zero_snr = ToyArchitecture()  # the shipped v5's
    acp = alphas_cumprod(zero_snr)
    sampler = ddim_scheduler(zero_snr)
    assert float(acp[-1]) < 1e-6 and sampler.config.prediction_type == "v_prediction"
    sampler.set_timesteps(4)
    assert int(sampler.timesteps[0]) == 999  # sampling starts from the pure noise the model was trained on
    for config in distill_configs(tmp_path, SCALES["smoke"], zero_snr, 0):
        assert config["schedule"]["prediction_type"] == "v_prediction"
        assert config["schedule"]["rescale_betas_zero_snr"] is True


class _FakeStage:
    """A stage that records its runs, ticks `steps` times on a fake clock and may fail once."""

    cached = True

    def __init__(self, name, log, *, resumes_from=None, steps=1, fail_once=False):
        self.name, self.log, self.resumes_from, self.steps, self.fail_once = name, log, resumes_from, steps, fail_once

    def run(self, workdir, tick):
        self.log.append(self.name)
        if self.resumes_from:
            (workdir / self.resumes_from).mkdir(exist_ok=True)
        for _ in range(self.steps):
            _FakeStage.now += 10.0
            tick()
            if self.fail_once:
                self.fail_once = False
                raise KeyboardInterrupt
        return {"ran": True}


def test_the_runner_skips_finished_stages_and_reruns_everything_after_one_that_ran(tmp_path, monkeypatch):
    from lcm_edge.distill.default_model import chain

    _FakeStage.now = 0.0
    monkeypatch.setattr(chain.time, "perf_counter", lambda: _FakeStage.now)
    log = []
    stages = [_FakeStage("a", log), _FakeStage("b", log, resumes_from="b_out", steps=3, fail_once=True),
              _FakeStage("c", log, resumes_from="c_out")]
    with pytest.raises(KeyboardInterrupt):  # stopped inside b after one optimizer step
        chain.run_recipe(stages, tmp_path)
    assert not (tmp_path / "done" / "b.json").exists()
    assert json.loads((tmp_path / "b_out" / "chain_seconds.json").read_text())["seconds"] == 10.0
    results = chain.run_recipe(stages, tmp_path)
    assert log == ["a", "b", "b", "c"]  # a's marker kept it; b resumed
    assert results["b"]["b_s"] == 40.0  # the stopped run's 10 s + the resume's 30 s
    (tmp_path / "c_out" / "checkpoint").mkdir()
    # Everything finished: nothing runs again.
    chain.run_recipe(stages, tmp_path)
    assert log == ["a", "b", "b", "c"]
    # a reruns (its marker gone): b and c follow, from scratch (c's checkpoints removed, its time counted anew).
    (tmp_path / "done" / "a.json").unlink()
    results = chain.run_recipe(stages, tmp_path)
    assert log[4:] == ["a", "b", "c"] and not (tmp_path / "c_out" / "checkpoint").exists()
    assert results["b"]["b_s"] == 30.0 and results["c"]["c_s"] == 10.0


def test_the_distill_stages_run_the_chains_configs_and_tick_every_step(tmp_path, monkeypatch):
    from lcm_edge.distill import train as train_module
    from lcm_edge.distill.default_model import chain
    from lcm_edge.distill.default_model.pretrain import ToyArchitecture

    seen, ticks = [], []

    def fake_train(cfg, callback=None):
        seen.append(cfg)
        callback(1, 0.0)
        callback(2, 0.0)

    monkeypatch.setattr(train_module, "train", fake_train)
    monkeypatch.setattr(chain, "_write_image_latents", lambda *args: None)
    stages = chain.recipe(tmp_path, chain.SCALES["smoke"], ToyArchitecture(), 0, lambda message: None)
    for stage in [s for s in stages if s.name in ("stage1", "stage2")]:
        stage.run(tmp_path, lambda: ticks.append(1))
    assert [cfg.stage for cfg in seen] == ["image", "video"] and len(ticks) == 4
    assert seen[1].model.lora == str(tmp_path / "stage1" / "lora") == seen[0].train.output_dir + "/lora"
    assert seen[1].model.lora_weight == chain.STAGE2_LORA_WEIGHT
    assert seen[0].consistency.target == chain.STAGE1_TARGET


def test_stage2_samples_on_the_chains_solver_grid(tmp_path):
    """Stage 2 distils on chain.STAGE2_DDIM_TIMESTEPS, refined to stage 1's 50-point grid below
    chain.STAGE2_FINE_BELOW; the bundle's sampler inherits the coarse grid and visits only trained timesteps."""
    from lcm_edge.distill.config import load_config
    from lcm_edge.distill.consistency import lcm_inference_timesteps, solver_timesteps
    from lcm_edge.distill.default_model import chain
    from lcm_edge.distill.default_model.pretrain import ToyArchitecture

    stage1, stage2 = chain.distill_configs(tmp_path, chain.SCALES["smoke"], ToyArchitecture(), 0)
    configs = []
    for name, config in (("stage1", stage1), ("stage2", stage2)):
        (tmp_path / f"{name}.json").write_text(json.dumps(config))
        configs.append(load_config(tmp_path / f"{name}.json"))
    loaded = [config.schedule for config in configs]
    # Strong guidance on stage 2's high timesteps only; stage 1 keeps the plain range and trains on data only.
    high = configs[1].consistency
    assert (high.high_w_from, high.high_w_min, high.high_w_max) == (chain.STAGE2_HIGH_W_FROM, *chain.STAGE2_HIGH_W)
    assert (high.w_min, high.w_max) == (configs[0].consistency.w_min, configs[0].consistency.w_max) == chain.GUIDANCE_W
    assert configs[0].consistency.high_w_from == 0 and configs[0].consistency.sampler_inputs == 0.0
    assert high.sampler_inputs == chain.STAGE2_SAMPLER_INPUTS
    assert (loaded[0].num_ddim_timesteps, loaded[1].num_ddim_timesteps) == (50, chain.STAGE2_DDIM_TIMESTEPS)
    assert loaded[1].lcm_scheduler_config()["original_inference_steps"] == chain.STAGE2_DDIM_TIMESTEPS
    grid1, grid2 = (set(schedule.solver_grid().tolist()) for schedule in loaded)
    assert grid1 == set(solver_timesteps(1000, 50).tolist())
    # Every stage-2 solver timestep is one stage 1 trained its LoRA on, and every sampler timestep a stage-2 one.
    assert grid2 <= grid1
    assert all(set(lcm_inference_timesteps(n, 1000, 10).tolist()) <= grid2 for n in (1, 2, 4, 8))
    assert all(set(timesteps) <= grid2 for timesteps in chain.DEFAULT_TIMESTEPS.values())
    fine = {t for t in grid2 if t < chain.STAGE2_FINE_BELOW}
    assert fine == {t for t in grid1 if t < chain.STAGE2_FINE_BELOW}
    assert grid2 - fine == {t for t in solver_timesteps(1000, 10).tolist() if t >= chain.STAGE2_FINE_BELOW}


def test_eval_seeds_repeat_the_prompts_and_intervals_narrow():
    """benchmarks/default_model_eval.py --seeds: the one-seed set comes first (same clips as before), every
    combination once per seed; the table's Wilson interval matches a textbook value and narrows with clips."""
    import default_model_eval as evaluation  # benchmarks/ is on the tests' path
    one, three = evaluation.prompt_set(60), evaluation.prompt_set(60, 3)
    assert len(set(one)) == 60 and three[:60] == one and three == one * 3
    lo, hi = evaluation.wilson_interval(0.5, 100)
    assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3
    assert evaluation.wilson_interval(0.0, 60)[0] == 0.0 and abs(evaluation.wilson_interval(1.0, 60)[1] - 1) < 1e-12
    wide, narrow = evaluation.wilson_interval(0.65, 60), evaluation.wilson_interval(0.65, 300)
    assert wide[0] < narrow[0] < 0.65 < narrow[1] < wide[1]


def test_stable_targets_share_a_caption_unless_it_was_dropped():
    """The teachers' Stable Target Field batch: same-caption clips as reference, a sample alone once its caption
    is dropped for classifier-free guidance (an empty caption says nothing about which clips it shares)."""
    import torch

    from lcm_edge.distill.default_model.pretrain import _stable_target
    from lcm_edge.distill.pretrain import same_caption_reference

    latents = torch.arange(5.0)[:, None, None].expand(5, 2, 2)  # clip i is all i
    reference = same_caption_reference(["left", "right", "left", "left", "right"])
    batch = _stable_target(latents, torch.tensor([0, 4, 3]), torch.tensor([False, False, True]), reference)
    assert batch["reference_mask"].tolist() == [[True, True, True], [True, True, False], [True, False, False]]
    assert batch["reference"][:, :, 0, 0].tolist() == [[0, 2, 3], [4, 1, 4], [3, 0, 2]]
    assert reference[1][2].all()  # the source mask is untouched by a dropped caption
    assert _stable_target(latents, torch.tensor([0]), torch.tensor([False]), None) == {}


def test_teacher_steps_train_with_stable_targets_and_an_anchored_pure_noise_batch(tmp_path, monkeypatch):
    """The chain's teacher stages as shipped (stable targets, three UNet levels, v-prediction on zero terminal SNR)
    at smoke scale: every frame's and clip's same-caption reference reaches the loss, the pure-noise stage trains
    on t >= 990 alone, and the anchor stage puts its high_noise_share of each batch there, the rest anywhere."""
    from dataclasses import replace

    import torch

    from lcm_edge.distill import pretrain
    from lcm_edge.distill.default_model import chain
    from lcm_edge.distill.default_model.pretrain import ToyArchitecture, alphas_cumprod

    calls = []
    real = pretrain.posterior_mean_x0

    def counted(x_t, a, reference, reference_mask=None):
        calls.append((reference.shape, int(reference_mask.sum()), a.flatten().clone()))
        return real(x_t, a, reference, reference_mask)

    monkeypatch.setattr(pretrain, "posterior_mean_x0", counted)
    arch = ToyArchitecture()
    scale = replace(chain.SCALES["smoke"], pure_noise_steps=2, pure_noise_schedule_steps=4, batch_pure_noise=2,
                    anchor_steps=2, anchor_schedule_steps=4, batch_anchor=3)
    stages = {stage.name: stage for stage in chain.recipe(tmp_path, scale, arch, 0, lambda message: None)}
    timings = {}
    for name in ("data", "tokenizer", "vae", "teacher_image", "teacher_motion", "teacher_pure_noise",
                 "teacher_anchor"):
        timings.update(stages[name].run(tmp_path, lambda: 1.0))
    image_calls, video_calls = calls[:scale.image_steps], calls[scale.image_steps:]
    assert len(video_calls) == scale.motion_steps + scale.pure_noise_steps + scale.anchor_steps
    assert timings["teacher_pure_noise_s"] > 0 and timings["teacher_anchor_s"] > 0
    assert video_calls[-1][0][0] == scale.batch_anchor
    # 24 smoke clips over 55 trained combinations: each caption's group is its one clip (x 16 frames as images).
    assert image_calls[0][0][1] == arch.num_frames and video_calls[0][0][1] == 1
    floor = float(alphas_cumprod(arch)[990])
    pure_noise_a = torch.stack([call[2] for call in video_calls[-scale.anchor_steps - scale.pure_noise_steps:
                                                                -scale.anchor_steps]])  # (steps, batch)
    assert bool((pure_noise_a <= floor).all())
    high = round(stages["teacher_anchor"].high_noise_share * scale.batch_anchor)
    anchor_a = torch.stack([call[2] for call in video_calls[-scale.anchor_steps:]])
    assert bool((anchor_a[:, :high] <= floor).all())
    assert bool((anchor_a[:, high:] > floor).any())  # 2 draws from every t: both >= 990 has odds 1e-4
    checks = json.loads((tmp_path / "teacher_check.json").read_text())
    assert all("direction_gain" in checks[name] for name in ("video", "video_pure_noise", "video_anchored"))

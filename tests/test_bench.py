"""`lcm-edge bench`: scenario parsing, bad input before any model loads, the FLOP formulas against
torch's own counter, and whole runs on the shipped bundle and on a tiny model with its PyTorch row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lcm_edge.bench.runner import BenchOptions, frame_fidelity, prepare_scenarios, run_bench
from lcm_edge.bench.scenarios import (Runtime, expand_matrix, load_scenario_file, parse_runtime, parse_size,
                                      resolve_against_bundles)
from lcm_edge.errors import InvalidArgumentError, MissingExtraError


def test_runtime_and_size_parsing():
    rt = parse_runtime("openvino:cpu,inference_precision=bf16,threads=2,static_shapes=false")
    assert (rt.backend, rt.device) == ("openvino", "CPU")
    assert dict(rt.options) == {"inference_precision": "bf16", "threads": 2, "static_shapes": False}
    assert rt.label == "openvino:CPU,inference_precision=bf16,static_shapes=false,threads=2"
    assert parse_runtime("onnxruntime") == Runtime("onnxruntime", "cpu")
    assert parse_size("512x256x16") == (512, 256, 16)
    scenarios = expand_matrix(bundles=["a", "b"], runtimes=["onnxruntime:cpu", "openvino:CPU"],
                              sizes=["256x256x8", "512x512x16"], steps=[1, 4], settings={"runs": 5})
    assert len(scenarios) == 16
    assert {s.runs for s in scenarios} == {5}
    assert {(s.height, s.frames) for s in scenarios} == {(256, 8), (512, 16)}


@pytest.mark.parametrize("text, argument", [
    ("tflite:cpu", "runtime"), ("onnxruntime:tpu", "runtime"), ("openvino:CPU,threads", "runtime"),
])
def test_bad_runtimes(text, argument):
    with pytest.raises(InvalidArgumentError) as info:
        parse_runtime(text)
    assert info.value.argument == argument and "Fix:" in str(info.value)


@pytest.mark.parametrize("text", ["256x256", "axbxc", "0x256x8"])
def test_bad_sizes(text):
    with pytest.raises(InvalidArgumentError) as info:
        parse_size(text)
    assert info.value.argument == "size"


def test_scenario_file_toml_and_json(tmp_path):
    (tmp_path / "m.toml").write_text(
        '[settings]\nwarmup = 0\nruns = 1\n\n'
        '[matrix]\nbundle = ["default"]\nruntime = ["onnxruntime:cpu", "openvino:CPU"]\nsize = ["64x64x8"]\n\n'
        '[[scenario]]\nbundle = "default"\nruntime = "onnxruntime:cpu,memory_arena=false"\nsteps = 2\n')
    scenarios, settings = load_scenario_file(tmp_path / "m.toml")
    assert settings == {"warmup": 0, "runs": 1}
    assert [s.runtime.label for s in scenarios] == ["onnxruntime:cpu", "openvino:CPU",
                                                    "onnxruntime:cpu,memory_arena=false"]
    assert scenarios[2].steps == 2 and scenarios[2].frames == 0  # 0: the bundle's default, filled in later
    resolved = resolve_against_bundles(scenarios)
    assert resolved[2].frames == 16 and resolved[0].frames == 8
    (tmp_path / "m.json").write_text(json.dumps({"scenario": [{"bundle": "default", "runtime": "openvino:CPU"}]}))
    assert len(load_scenario_file(tmp_path / "m.json")[0]) == 1
    (tmp_path / "bad.toml").write_text("[matrix]\nruntime = ['onnxruntime:cpu']\n")
    with pytest.raises(InvalidArgumentError, match="no 'bundle'"):
        load_scenario_file(tmp_path / "bad.toml")


@pytest.mark.parametrize("size, argument", [("64x64x40", "size"), ("60x64x16", "size")])
def test_scenario_the_bundle_cannot_take(size, argument):
    scenarios = expand_matrix(bundles=["default"], runtimes=["onnxruntime:cpu"], sizes=[size])
    with pytest.raises(InvalidArgumentError) as info:
        resolve_against_bundles(scenarios)
    assert info.value.argument == argument and "Fix:" in str(info.value)


def _options(tmp_path, **kw):
    return BenchOptions(out=tmp_path / "out", plots=False, peak_probe=False, progress=lambda msg: None, **kw)


def test_bad_input_stops_before_any_model_loads(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
    matrix = dict(bundles=["default"], sizes=["64x64x8"])
    with pytest.raises(InvalidArgumentError) as info:  # an option the backend does not take
        prepare_scenarios(expand_matrix(runtimes=["onnxruntime:cpu,bogus=1"], **matrix), _options(tmp_path))
    assert info.value.argument == "runtime"
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InvalidArgumentError) as info:  # an output folder that cannot be written
        prepare_scenarios(expand_matrix(runtimes=["onnxruntime:cpu"], **matrix),
                          BenchOptions(out=blocker / "out", plots=False))
    assert info.value.argument == "out"
    with pytest.raises(InvalidArgumentError) as info:  # a PyTorch row without source weights
        prepare_scenarios(expand_matrix(runtimes=["pytorch:cpu"], **matrix), _options(tmp_path))
    assert info.value.argument == "torch_source"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    with pytest.raises(MissingExtraError, match=r"lcm-edge\[export\]"):  # the PyTorch rows' extra is missing
        prepare_scenarios(expand_matrix(runtimes=["pytorch:cpu"], settings={"torch_source": {"base": "x"}},
                                        **matrix), _options(tmp_path))
    assert started == []


def test_unavailable_devices_are_skipped_not_zero(tmp_path):
    planned = prepare_scenarios(expand_matrix(bundles=["default"], runtimes=["onnxruntime:tensorrt", "openvino:NPU"],
                                              sizes=["64x64x8"]), _options(tmp_path))
    reasons = {s.runtime.label: reason for s, reason in planned}
    assert reasons["onnxruntime:cpu"] is None  # the fidelity reference, added
    assert "TensorrtExecutionProvider" in reasons["onnxruntime:tensorrt"]
    assert "NPU" in reasons["openvino:NPU"]


def test_frame_fidelity():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    assert frame_fidelity(a, a) == {"psnr_db": None, "max_abs": 0, "identical": True}
    b = a.astype(np.int16)
    b[0, 0, 0, 0] = 255 - b[0, 0, 0, 0]
    f = frame_fidelity(b.clip(0, 255).astype(np.uint8), a)
    mse = (int(b[0, 0, 0, 0]) - int(a[0, 0, 0, 0])) ** 2 / a.size
    assert f["max_abs"] == abs(int(b[0, 0, 0, 0]) - int(a[0, 0, 0, 0]))
    assert f["psnr_db"] == pytest.approx(10 * np.log10(255**2 / mse))


def test_flop_formulas_match_torch_flop_counter(tiny_bundle, tiny_components, one_torch_thread):
    """The graph-derived formula against torch's FlopCounterMode on the same weights, at a shape it was not fitted on."""
    import copy

    import torch
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    from lcm_edge.bench.flops import bundle_flops
    from lcm_edge.export.wrappers import UNetWrapper, VaeDecoderWrapper

    formulas = bundle_flops(tiny_bundle)
    frames, h, w = 5, 6, 4  # latent pixels; the tiny UNet has one downsampler
    sample = torch.randn(1, 4, frames, h, w)
    emb = torch.randn(1, 77, 32)
    # torch counts no FLOPs for SDPA on CPU: the classic processor's bmm attention is counted.
    unet, vae = copy.deepcopy(tiny_components["unet"]), copy.deepcopy(tiny_components["vae"])
    unet.set_attn_processor(AttnProcessor())
    vae.set_attn_processor(AttnProcessor())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        UNetWrapper(unet)(sample, torch.tensor([999.0]), emb)
    expected = counter.get_total_flops()
    got = formulas["unet"].evaluate(frames, h * w)
    print(f"\n[flops] tiny UNet at {frames}x{h}x{w}: graph formula {got:.0f}, torch FlopCounterMode {expected}")
    assert got == pytest.approx(expected, rel=0.02)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        VaeDecoderWrapper(vae)(torch.randn(1, 4, h, w))
    assert formulas["vae_decoder"].evaluate(1, h * w) == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_bench_runs_the_default_bundle_end_to_end(tmp_path):
    """The CLI on the shipped model: two runtimes, a skipped one, an over-memory one; every output written."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "lcm_edge", "bench", "--runtime", "onnxruntime:cpu", "openvino:CPU",
           "onnxruntime:cuda", "--size", "64x64x8", "--warmup", "1", "--runs", "2", "--no-peak-probe",
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    rows = {r["scenario"]["runtime"]["label"]: r for r in doc["rows"]}
    assert rows["onnxruntime:cuda"]["status"] == "skipped"
    for label in ("onnxruntime:cpu", "openvino:CPU"):
        row = rows[label]
        assert row["status"] == "ok", row
        assert len(row["runs"]) == 2 and all(len(r["unet_steps_s"]) == 4 for r in row["runs"])
        assert row["total_s"]["median"] > row["unet_step_s"]["median"] > 0
        assert row["peak_rss_first_gib"] > 0.05 and row["unet_gflops"] > 0 and row["flops"]["unet_step"] > 0
    assert rows["onnxruntime:cpu"]["fidelity"]["identical"]
    assert rows["openvino:CPU"]["fidelity"]["max_abs"] <= 2  # same latents and noise, another runtime
    assert doc["machine"]["cpu"]["flags"] and doc["bundles"]
    for name in ("results.csv", "results.md", "plots/latency_by_stage.png", "plots/speedup_vs_pytorch.png",
                 "plots/peak_rss.png"):
        assert (out / name).stat().st_size > 100, name
    assert "| openvino:CPU |" in (out / "results.md").read_text()


def test_crashes_timeouts_and_memory_kills_are_recorded_and_the_matrix_goes_on(tmp_path):
    scenarios = expand_matrix(bundles=["default"], runtimes=["onnxruntime:cpu"], sizes=["64x64x8"],
                              settings={"warmup": 0, "runs": 1})
    doc = run_bench(scenarios, _options(tmp_path, memory_limit_gib=0.01, reference="none"))
    assert [r["status"] for r in doc["rows"]] == ["killed-memory"]
    scenarios = expand_matrix(bundles=["default"], runtimes=["onnxruntime:cpu", "openvino:CPU"], sizes=["64x64x8"],
                              settings={"warmup": 0, "runs": 1, "timeout_s": 0.5})
    doc = run_bench(scenarios, _options(tmp_path, reference="none"))
    assert [r["status"] for r in doc["rows"]] == ["timeout", "timeout"]
    assert "still running" in doc["rows"][1]["reason"]


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory, tiny_components):
    """The tiny model saved as a diffusers folder: the source the PyTorch rows load with the exporter's loaders."""
    folder = tmp_path_factory.mktemp("tiny_source")
    c = tiny_components
    c["unet"].save_pretrained(folder / "unet")
    c["vae"].save_pretrained(folder / "vae")
    c["text_encoder"].save_pretrained(folder / "text_encoder")
    c["tokenizer"].save_pretrained(folder / "tokenizer")
    c["scheduler"].save_pretrained(folder / "scheduler")
    return folder


def test_pytorch_reference_row_matches_the_runtime(tmp_path, tiny_bundle, tiny_source):
    """diffusers eager on the bundle's source weights, same latents/noise/schedule: frames within a grey level."""
    out = tmp_path / "bench"
    scenarios = tmp_path / "scenarios.toml"
    scenarios.write_text(
        f'[settings]\nwarmup = 0\nruns = 1\ntorch_source = {{ base = "{tiny_source}" }}\n\n'
        f'[[scenario]]\nbundle = "{tiny_bundle}"\nruntime = ["pytorch:cpu,threads=1", "onnxruntime:cpu"]\n'
        'size = "32x24x4"\nsteps = 1\n\n'
        f'[[scenario]]\nbundle = "{tiny_bundle}"\nruntime = ["pytorch:cpu,threads=1", "onnxruntime:cpu"]\n'
        'size = "32x24x4"\nsteps = 3\nguidance = 1.8\n')
    cmd = [sys.executable, "-m", "lcm_edge", "bench", "--scenarios", str(scenarios), "--no-peak-probe", "--no-plots",
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["rows"]) == 4  # the onnxruntime rows are the groups' references: none added
    rows = {(r["scenario"]["runtime"]["backend"], r["scenario"]["steps"]): r for r in doc["rows"]}
    for steps in (1, 3):
        row = rows["pytorch", steps]
        assert row["status"] == "ok", row
        assert "AnimateDiffPipeline eager" in row["describe"]
        assert row["fidelity"]["max_abs"] <= 1, row["fidelity"]
        assert len(row["runs"][0]["unet_steps_s"]) == steps
        assert rows["onnxruntime", steps]["speedup_vs_pytorch_eager"] > 0
    # The comparison sees real, different clips (the settings reach both sides).
    one, three = (np.load(out / "frames" / rows["onnxruntime", n]["frames_file"]).astype(int) for n in (1, 3))
    assert one.std() > 5 and np.abs(one - three).max() > 10

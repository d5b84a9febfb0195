"""The runtime's behaviour: inputs checked up front, cancel, progress, timings, saving, torch-free."""

from __future__ import annotations

import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest

from lcm_edge import (AnimateLCMPipeline, BackendError, GenerationCancelled, GraphInputError,
                      InvalidArgumentError, PromptTruncatedWarning, create_backend)


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return AnimateLCMPipeline.from_bundle(tiny_bundle, backend="onnxruntime", device="cpu")


def small(pipe, **kwargs):
    args = {"num_frames": 4, "height": 16, "width": 16, "num_inference_steps": 2, "seed": 3}
    args.update(kwargs)
    return pipe("a blue square moving up", **args)


def test_result_shape_seed_and_timings(pipe):
    result = small(pipe, num_inference_steps=4)
    assert result.frames.dtype == np.uint8 and result.frames.shape == (4, 16, 16, 3)
    assert result.seed == 3
    assert len(result.timings.unet_steps_s) == 4
    t = result.timings
    assert 0 < t.text_encoder_s < t.total_s and 0 < t.vae_decode_s < t.total_s
    assert "unet" in t.summary()


def test_seed_reproducible_and_random_seed_reported(pipe):
    a, b = small(pipe), small(pipe)
    np.testing.assert_array_equal(a.frames, b.frames)
    c = small(pipe, seed=None)
    assert isinstance(c.seed, int)
    np.testing.assert_array_equal(small(pipe, seed=c.seed).frames, c.frames)


def test_chunked_decode_equals_whole_decode(pipe):
    whole = small(pipe, decode_chunk_size=4)
    chunked = small(pipe, decode_chunk_size=1)
    np.testing.assert_array_equal(whole.frames, chunked.frames)


def test_progress_callback(pipe):
    seen = []
    small(pipe, num_inference_steps=4, callback=seen.append)
    assert [s.step for s in seen] == [0, 1, 2, 3]
    assert [s.timestep for s in seen] == [999, 749, 499, 249]


def test_cancel_from_another_thread(pipe):
    cancel = threading.Event()

    def press_cancel(info):
        if info.step == 0:
            threading.Thread(target=cancel.set).start()
            threading.Event().wait(0.2)

    with pytest.raises(GenerationCancelled) as err:
        small(pipe, num_inference_steps=4, callback=press_cancel, cancel_event=cancel)
    assert "UNet step 2/4" in str(err.value)


def test_long_prompt_is_truncated_and_reported(pipe):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pipe("red " * 100, num_frames=2, height=16, width=16, num_inference_steps=1, seed=0)
    assert any(issubclass(w.category, PromptTruncatedWarning) for w in caught)
    assert result.truncated_text.strip().startswith("red")


@pytest.mark.parametrize("kwargs, argument", [
    ({"height": 18}, "height"),
    ({"width": 0}, "width"),
    ({"num_frames": 33}, "num_frames"),
    ({"num_frames": 0}, "num_frames"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 101}, "num_inference_steps"),
    ({"guidance_scale": 0.5}, "guidance_scale"),
    ({"guidance_scale": float("nan")}, "guidance_scale"),
    ({"negative_prompt": "blurry"}, "negative_prompt"),
    ({"seed": -1}, "seed"),
    ({"latents": np.zeros((1, 4, 2, 8, 8), np.float32)}, "latents"),
    ({"decode_chunk_size": 0}, "decode_chunk_size"),
])
def test_bad_arguments_are_named(pipe, kwargs, argument):
    with pytest.raises(InvalidArgumentError) as err:
        small(pipe, **kwargs)
    assert err.value.argument == argument
    assert "Fix:" in str(err.value)


def test_prompt_must_be_text(pipe):
    with pytest.raises(InvalidArgumentError) as err:
        pipe(["a list"], num_frames=2, height=16, width=16)
    assert err.value.argument == "prompt"


def test_unknown_backend_device_provider():
    with pytest.raises(BackendError, match="backend"):
        create_backend("tensorflow")
    with pytest.raises(BackendError, match="available providers"):
        create_backend("onnxruntime", "cuda")  # not installed on the CPU test machine
    with pytest.raises(BackendError, match="unknown onnxruntime provider"):
        create_backend("onnxruntime", "quantum")
    with pytest.raises(BackendError, match="unknown OpenVINO device"):
        create_backend("openvino", "TPU")
    with pytest.raises(BackendError, match="not available"):
        create_backend("openvino", "NPU")


def test_graph_inputs_checked_against_graph_metadata(pipe):
    with pytest.raises(GraphInputError, match="input_ids"):
        pipe.text_encoder.run({"input_ids": np.zeros((1, 77), np.int32)})
    with pytest.raises(GraphInputError, match="axis 1"):
        pipe.text_encoder.run({"input_ids": np.zeros((1, 70), np.int64)})
    with pytest.raises(GraphInputError, match="missing"):
        pipe.unet.run({"sample": np.zeros((1, 4, 2, 4, 4), np.float32)})


# A 256-colour GIF of a clip, read back: mean abs difference from the frames, 0-255 (random-weight
# clips, the hardest to palette; the default model's clips measure 6).
MAX_GIF_MEAN_ABS_ERROR = 12.0


def test_save_mp4_and_gif_atomically(pipe, tmp_path):
    import cv2

    result = small(pipe)
    mp4 = result.save(tmp_path / "clip.mp4")
    gif = result.save(tmp_path / "clip.gif", fps=4)
    assert cv2.VideoCapture(str(mp4)).get(cv2.CAP_PROP_FRAME_COUNT) == 4
    ok, animation = cv2.imreadanimation(str(gif))
    assert ok and len(animation.frames) == 4
    read = np.stack([cv2.cvtColor(frame[..., :3], cv2.COLOR_BGR2RGB) for frame in animation.frames])
    error = np.abs(read.astype(np.float32) - result.frames).mean()
    assert error <= MAX_GIF_MEAN_ABS_ERROR, f"the GIF is {error:.1f}/255 away from the frames"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif", "clip.mp4"]  # no temp files left


@pytest.mark.parametrize("name", ["missing_dir/clip.mp4", "clip.avi", "clip"])
def test_bad_output_path(pipe, tmp_path, name):
    result = small(pipe, num_inference_steps=1)
    with pytest.raises(InvalidArgumentError) as err:
        result.save(tmp_path / name)
    assert err.value.argument == "output"
    assert list(tmp_path.iterdir()) == []


def test_generation_never_imports_torch(tiny_bundle, tmp_path):
    """A whole generation in a fresh process: torch, diffusers, transformers never load."""
    code = f"""
import sys
import lcm_edge
assert "torch" not in sys.modules
pipe = lcm_edge.AnimateLCMPipeline.from_bundle({str(tiny_bundle)!r})
result = pipe("a green triangle moving left", num_frames=4, height=16, width=16, seed=1)
result.save({str(tmp_path / "clip.gif")!r})
ov = lcm_edge.AnimateLCMPipeline.from_bundle({str(tiny_bundle)!r}, backend="openvino")
ov("a green triangle moving left", num_frames=4, height=16, width=16, seed=1)
leaked = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
print("LEAKED", leaked)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "LEAKED []" in out.stdout
    assert (tmp_path / "clip.gif").stat().st_size > 0


def test_openvino_compile_cache_and_precision(tiny_bundle, tmp_path):
    cache = tmp_path / "ov_cache"
    pipe = AnimateLCMPipeline.from_bundle(tiny_bundle, backend="openvino", device="CPU", cache_dir=cache,
                                          performance_hint="THROUGHPUT")
    small(pipe, num_inference_steps=1)  # static shapes (the default) compile at a call's shape
    assert any(cache.iterdir()), "OpenVINO wrote no compiled blobs to cache_dir"
    assert "THROUGHPUT f32" in pipe.backend.describe()
    assert pipe.unet.path.name == "openvino_model.xml"  # the bundle's IR, not the ONNX graph
    with pytest.raises(BackendError, match="inference_precision"):
        create_backend("openvino", "CPU", inference_precision="int4")
    with pytest.raises(BackendError, match="performance_hint"):
        create_backend("openvino", "CPU", performance_hint="FASTEST")


def test_onnxruntime_options(tiny_bundle):
    pipe = AnimateLCMPipeline.from_bundle(tiny_bundle, threads=1, optimization="basic", memory_arena=False)
    assert small(pipe, num_inference_steps=1).frames.shape == (4, 16, 16, 3)
    with pytest.raises(BackendError, match="optimization"):
        create_backend("onnxruntime", "cpu", optimization="max")


def test_cli_wires_distill(tmp_path, capsys):
    from lcm_edge.cli import main

    assert main(["distill", "image", "--config", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--config" in err and "Fix:" in err


def test_run_command_turns_our_errors_and_ctrl_c_into_exit_codes(capsys):
    from lcm_edge.errors import InvalidArgumentError, run_command

    def bad_argument():
        raise InvalidArgumentError("--steps", "0 is below 1", "pass --steps 4")

    def ctrl_c():
        raise KeyboardInterrupt

    assert run_command(bad_argument) == 2
    assert "error: --steps: 0 is below 1. Fix: pass --steps 4" in capsys.readouterr().err
    assert run_command(ctrl_c, interrupted="interrupted: resume with --resume latest") == 130
    assert "resume with --resume latest" in capsys.readouterr().err
    assert run_command(lambda: 0) == 0
    with pytest.raises(ZeroDivisionError):  # a bug is not an input error: it keeps its traceback
        run_command(lambda: 1 // 0)

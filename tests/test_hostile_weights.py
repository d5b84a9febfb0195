"""Hostile and broken weight files: every one is a typed error, and nothing in them is ever executed.

Covers export/weights.py (every .safetensors / .ckpt read goes through read_weight_file), the strict loading of
export/checkpoints.py and the sharded folders of export/sources.py.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from lcm_edge.errors import InvalidArgumentError, LcmEdgeError  # noqa: E402
from lcm_edge.export.checkpoints import load_ldm_checkpoint, to_ldm_state_dict  # noqa: E402
import lcm_edge.export.weights as weights  # noqa: E402
from lcm_edge.export.weights import WeightsMismatchError, read_diffusers_weights, read_weight_file  # noqa: E402


@pytest.fixture(scope="module")
def tiny_sd(one_torch_thread):
    from test_loaders import tiny_text_encoder, tiny_unet2d, tiny_vae

    unet, vae, text = tiny_unet2d(21), tiny_vae(22), tiny_text_encoder(23)
    configs = {"unet_config": {k: v for k, v in unet.config.items() if not k.startswith("_")},
               "vae_config": {k: v for k, v in vae.config.items() if not k.startswith("_")},
               "text_config": {k: v for k, v in text.config.to_dict().items() if not k.startswith("_")}}
    return to_ldm_state_dict(unet, vae, text), configs


# ---------------------------------------------------------------- pickles that would run code

class _RunsCode:
    """Unpickling this calls open(marker, "w"): the file appears iff the pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("container", ["torch zip", "raw pickle", "nested in state_dict"])
def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.ckpt"
    evil = _RunsCode(marker)
    if container == "torch zip":
        torch.save({"weight": torch.zeros(2), "payload": evil}, path)
    elif container == "raw pickle":
        path.write_bytes(pickle.dumps({"weight": evil}))
    else:
        torch.save({"state_dict": {"weight": torch.zeros(2)}, "callbacks": [evil]}, path)
    # The test's own pickle machinery is sound: loading it without protection does run it.
    assert not marker.exists()
    with pytest.raises(InvalidArgumentError) as info:
        read_weight_file(path, "--base")
    assert not marker.exists(), "the pickle ran"
    assert info.value.argument == "--base" and str(path) in info.value.problem


def test_the_marker_pickle_does_run_when_unpickled_unprotected(tmp_path):
    """Proves the payload above is live: without weights_only it creates its marker."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_RunsCode(marker)))
    assert marker.exists()


# ---------------------------------------------------------------- zip bombs

def _zip_bomb(path: Path, numel: int) -> None:
    """A torch checkpoint whose one storage (numel float32 zeros) is deflated: a small file that a reader
    would inflate to 4 * numel bytes."""
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(numel)}, buffer)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            big = len(data) >= 4 * numel
            dst.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED if big else zipfile.ZIP_STORED)


def test_a_zip_bomb_ckpt_is_refused_before_anything_is_inflated(tmp_path, monkeypatch):
    path = tmp_path / "bomb.ckpt"
    numel = 1 << 24  # 64 MiB inflated, ~64 KiB on disk
    _zip_bomb(path, numel)
    declared = 4 * numel
    assert path.stat().st_size * weights.ZIP_MAX_EXPANSION + weights.ZIP_SLACK_BYTES < declared

    def no_torch_load(*_a, **_k):
        raise AssertionError("torch.load was reached: the archive was not checked first")

    monkeypatch.setattr(torch, "load", no_torch_load)
    with pytest.raises(InvalidArgumentError) as info:
        read_weight_file(path, "--motion-module")
    assert "expand" in info.value.problem and str(declared) in info.value.problem


def test_an_ordinary_torch_checkpoint_passes_the_zip_check(tmp_path):
    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"a": torch.arange(1000.0), "b": torch.ones(3, 3)}}, path)
    loaded = read_weight_file(path, "--base")
    assert sorted(loaded.tensors) == ["a", "b"]


# ---------------------------------------------------------------- truncated and malformed files

def _safetensors_bytes(tensors) -> bytes:
    return safetensors_torch.save(tensors)


@pytest.mark.parametrize("damage", ["truncated", "header length past the end", "offsets past the end",
                                    "header not json", "empty file", "garbage"])
def test_broken_safetensors_are_typed(tmp_path, damage):
    good = _safetensors_bytes({"w": torch.ones(64, 64), "b": torch.zeros(64)})
    (length,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + length])
    if damage == "truncated":
        data = good[:len(good) // 2]
    elif damage == "header length past the end":
        data = struct.pack("<Q", 1 << 40) + good[8:]
    elif damage == "offsets past the end":
        header["w"]["data_offsets"] = [0, 1 << 30]
        text = json.dumps(header).encode()
        data = struct.pack("<Q", len(text)) + text + good[8 + length:]
    elif damage == "header not json":
        data = struct.pack("<Q", 6) + b"{{{{{{" + good[8 + length:]
    elif damage == "empty file":
        data = b""
    else:
        data = bytes(range(256)) * 64
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    with pytest.raises(InvalidArgumentError) as info:
        read_weight_file(path, "--lora")
    assert info.value.argument == "--lora"


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_broken_ckpt_files_are_typed(tmp_path, damage):
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(256, 256)}, buffer)
    data = buffer.getvalue()
    path = tmp_path / "model.ckpt"
    path.write_bytes(data[:len(data) // 3] if damage == "truncated" else b"\x80\x04garbage" * 100)
    with pytest.raises(InvalidArgumentError):
        read_weight_file(path, "--motion-module")


# ---------------------------------------------------------------- wrong dtypes, shapes off by one

def _key(ldm: dict, fragment: str) -> str:
    return next(k for k in sorted(ldm) if fragment in k and k.endswith(".weight"))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.uint8])
def test_a_weight_of_a_non_float_dtype_is_a_mismatch(tmp_path, tiny_sd, dtype):
    ldm, configs = tiny_sd
    key = _key(ldm, "model.diffusion_model.input_blocks.0.0")
    path = tmp_path / "wrong_dtype.safetensors"
    safetensors_torch.save_file({**ldm, key: torch.ones(ldm[key].shape, dtype=dtype)}, str(path))
    with pytest.raises(WeightsMismatchError) as info:
        load_ldm_checkpoint(path, **configs)
    assert any(key in m and str(dtype).replace("torch.", "") in m for m in info.value.mismatched), info.value


@pytest.mark.parametrize("where", ["model.diffusion_model.out.2", "first_stage_model.decoder.conv_out",
                                   "cond_stage_model.transformer.text_model.final_layer_norm"])
def test_a_shape_off_by_one_is_a_mismatch(tmp_path, tiny_sd, where):
    ldm, configs = tiny_sd
    key = _key(ldm, where)
    shape = list(ldm[key].shape)
    shape[0] += 1
    path = tmp_path / "off_by_one.safetensors"
    safetensors_torch.save_file({**ldm, key: torch.zeros(shape)}, str(path))
    with pytest.raises(WeightsMismatchError) as info:
        load_ldm_checkpoint(path, **configs)
    assert any(m.startswith(key) for m in info.value.mismatched), info.value


def test_the_unchanged_tiny_checkpoint_loads(tmp_path, tiny_sd):
    ldm, configs = tiny_sd
    path = tmp_path / "ok.safetensors"
    safetensors_torch.save_file(ldm, str(path))
    models = load_ldm_checkpoint(path, **configs)
    assert models.unet is not None


# ---------------------------------------------------------------- sharded folders that point elsewhere

@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../x.safetensors"])
def test_a_shard_index_pointing_outside_its_folder_is_refused(tmp_path, shard):
    folder = tmp_path / "unet"
    folder.mkdir()
    (tmp_path / "outside.safetensors").write_bytes(_safetensors_bytes({"w": torch.ones(2)}))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(LcmEdgeError) as info:
        read_diffusers_weights(folder, "--base")
    assert "shard" in str(info.value)

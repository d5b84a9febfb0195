"""The export's OpenVINO gate holds one compiled graph at a time (issue 24: two compiled full-size UNets, one per gate
shape, took the fp32 export from 12 to 20 GiB peak RSS), on the shipped default bundle's UNet at the gate's shapes."""

from __future__ import annotations

import numpy as np
import pytest

from lcm_edge import create_backend, load_bundle
from lcm_edge.default import default_bundle_path
from lcm_edge.export.openvino_ir import GATE_SHAPE_CACHE_SIZE, openvino_gate_backend
from lcm_edge.export.specs import model_shape_cases, sample_inputs, unet_spec

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(default_bundle_path())


def gate_feeds(bundle) -> list[dict[str, np.ndarray]]:
    model = bundle.model
    spec = unet_spec(model.latent_channels, model.text_max_length, model.text_hidden_size)
    _, cases = model_shape_cases(model)
    rng = np.random.default_rng(0)
    return [sample_inputs(spec, case, vocab_size=1000, rng=rng) for case in cases.values()]


def compiles_with_alive(session, monkeypatch) -> list[int]:
    """Records, at each compile, how many compiled shapes the session still holds."""
    alive = []
    original = session._compile

    def recording(model, shapes):
        alive.append(len(session._compiled))
        return original(model, shapes)

    monkeypatch.setattr(session, "_compile", recording)
    return alive


def test_openvino_gate_never_holds_two_compiled_graphs(bundle, monkeypatch):
    backend = openvino_gate_backend()
    assert backend.static_shapes and backend.shape_cache_size == GATE_SHAPE_CACHE_SIZE == 1
    session = backend.open(bundle.root, bundle.components["unet"])
    alive = compiles_with_alive(session, monkeypatch)
    feeds = gate_feeds(bundle)
    assert len({f["sample"].shape for f in feeds}) == len(feeds) > 1  # each gate shape compiles anew
    for f in feeds:
        assert np.isfinite(session.run(f)["out_sample"]).all()
    assert alive == [0] * len(feeds)  # the previous shape was released before each compile
    assert len(session.compiled_shapes()) == 1


def test_shape_lru_evicts_before_compiling(bundle, monkeypatch):
    """Any cache size: a new shape compiles with at most shape_cache_size - 1 others alive."""
    session = create_backend("openvino", shape_cache_size=2).open(bundle.root, bundle.components["unet"])
    alive = compiles_with_alive(session, monkeypatch)
    feeds = gate_feeds(bundle)
    third = {**feeds[0], "sample": np.concatenate([feeds[0]["sample"]] * 2, axis=2)}  # more frames
    for f in (*feeds, third):
        session.run(f)
    assert alive == [0, 1, 1]
    assert [s[0][2] for s in session.compiled_shapes()] == [feeds[1]["sample"].shape[2], third["sample"].shape[2]]

"""Hostile and broken bundles: a seeded mutation fuzzer over a copy of the default bundle.

Every mutated bundle either loads (the mutation was harmless, and then everything the pipeline derives from it
before compiling a graph works) or raises a BundleError whose path lies in the bundle; never another exception,
never a hang, never a read outside the bundle folder (watched with an audit hook on every open). The manifest's
sha256 and size entries are updated for each mutated file, so the parsers behind the checksum are what is
fuzzed; a bundle that keeps stale checksums is refused before any of them runs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
from pathlib import Path

import pytest

from lcm_edge import default_bundle_path
from lcm_edge.bundle import load_bundle
from lcm_edge.errors import BundleError
from lcm_edge.pipeline import check_inputs
from lcm_edge.scheduler import LCMScheduler
from lcm_edge.tokenizer import CLIPTokenizer

SEED = 27
CASES_PER_FILE = 60
CASE_SECONDS = 5  # far above a load's ~10 ms: only a hang reaches it
CASE_BYTES = 1 << 30  # memory one case may take on top of what the test process holds
JSON_FILES = ("bundle.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json",
              "tokenizer/vocab.json")
TEXT_FILES = ("tokenizer/merges.txt",)
HOSTILE_VALUES = [None, True, False, 0, -1, 1, 2**31, 2**63, 10**400, -(10**30), 1e308, -1e308, math.nan,
                  math.inf, -math.inf, 0.5, "", "x", "../../etc/passwd", "/etc/passwd", "\x00", "é" * 5000, [],
                  [1, "a", None], {}, {"a": {"b": []}}]
ESCAPING_PATHS = ["../../etc/passwd", "/etc/passwd", "tokenizer/../../outside.txt", "../outside.txt",
                  "./../outside.txt", "C:\\Windows\\win.ini", "", ".", "tokenizer", "tokenizer//vocab.json",
                  "\x00", "tokenizer/\x00vocab.json"]


# ---------------------------------------------------------------- harness

class _Reads:
    """Every file opened while `active` (an audit hook: it sees opens by any library that goes through Python)."""

    def __init__(self):
        self.active = False
        self.paths: list[str] = []
        sys.addaudithook(self._hook)

    def _hook(self, event, args):
        if self.active and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            self.paths.append(os.fsdecode(args[0]))


_READS = _Reads()


class _Hang(Exception):
    pass


def _alarm(_signum, _frame):
    raise _Hang()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pipeline_preflight(root: Path, checksums: bool) -> None:
    """What AnimateLCMPipeline does with a bundle before it compiles a graph, and the checks of a call."""
    bundle = load_bundle(root, verify_checksums=checksums)
    tokenizer = CLIPTokenizer.from_folder(bundle.tokenizer_dir)
    tokenizer.encode("a red circle moving right")
    check_inputs(bundle, "a red circle moving right")
    LCMScheduler(bundle.scheduler_config).set_timesteps(4)
    bundle.path(bundle.components["unet"].onnx)


def _address_space_limit(extra: int):
    """Soft RLIMIT_AS at the current size + `extra`: an allocation sized by a hostile number fails fast with
    MemoryError (reported as a finding) instead of swapping a shared machine."""
    try:
        import resource

        status = Path("/proc/self/status").read_text()
    except (ImportError, OSError):
        return None
    size = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmSize:"))) * 1024
    old = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size + extra, old[1]))
    return lambda: resource.setrlimit(resource.RLIMIT_AS, old)


def check_case(root: Path, what: str, checksums: bool = True) -> str:
    """'ok' or 'refused'; anything else fails the test, naming the case. Without `checksums` (hashing the
    10 MB UNet is most of a case's time) sizes are still checked, and the mutated files' entries are current."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    unlimit = _address_space_limit(CASE_BYTES)
    _READS.paths.clear()
    _READS.active = True
    try:
        _pipeline_preflight(root, checksums)
        outcome = "ok"
    except BundleError as exc:
        inside = Path(exc.path).resolve(strict=False)
        assert inside == root.resolve() or root.resolve() in inside.parents, \
            f"{what}: the error names {exc.path!r}, not a file of the bundle"
        outcome = "refused"
    except _Hang:
        pytest.fail(f"{what}: loading did not finish in {CASE_SECONDS} s")
    except Exception as exc:  # noqa: BLE001 - the point of the fuzzer
        pytest.fail(f"{type(exc).__name__}: {str(exc)[:300]} <- {what[:1500]}")
    finally:
        _READS.active = False
        signal.alarm(0)
        if unlimit is not None:
            unlimit()
    outside = [p for p in _READS.paths if root.resolve() not in Path(p).resolve().parents]
    assert not outside, f"{what}: read outside the bundle: {outside}"
    return outcome


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz") / "bundle"
    shutil.copytree(default_bundle_path(), root)
    (root.parent / "outside.txt").write_text("a file beside the bundle, never to be read\n")
    return root


class Bundle:
    """Mutate one file of the copy (keeping the manifest's checksum of it current), check, restore."""

    def __init__(self, root: Path):
        self.root = root
        self.pristine = {rel: (root / rel).read_bytes() for rel in JSON_FILES + TEXT_FILES}
        self.manifest = json.loads(self.pristine["bundle.json"])

    def write(self, rel: str, data: bytes, manifest: dict | None = None) -> None:
        manifest = copy.deepcopy(self.manifest if manifest is None else manifest)
        if rel != "bundle.json":
            (self.root / rel).write_bytes(data)
            if isinstance(manifest.get("files"), dict) and rel in manifest["files"]:
                manifest["files"][rel] = {"sha256": _sha(data), "size": len(data)}
            data = json.dumps(manifest).encode()
        (self.root / "bundle.json").write_bytes(data)

    def restore(self) -> None:
        for rel, data in self.pristine.items():
            path = self.root / rel
            if path.is_symlink() or path.exists():
                path.unlink()
            path.write_bytes(data)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,))


def _mutate(doc, rng: random.Random):
    """One structural mutation at a random place: replace, delete, add a key, rename a key, nest deeply."""
    doc = copy.deepcopy(doc)
    paths = list(_paths(doc))[1:] or [()]
    # bundle.json is mostly provenance, which nothing interprets: aim most mutations at what is parsed.
    parsed = [p for p in paths if not p or p[0] != "provenance"]
    path = rng.choice(parsed if rng.random() < 0.9 else paths)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1] if path else None
    op = rng.choice(["replace", "replace", "delete", "add", "rename", "nest"])
    if key is None:
        return rng.choice(HOSTILE_VALUES)
    if op == "replace":
        parent[key] = rng.choice(HOSTILE_VALUES)
    elif op == "delete":
        del parent[key]
    elif op == "add" and isinstance(parent, dict):
        parent[rng.choice(["extra", "__proto__", "files", "size", ""])] = rng.choice(HOSTILE_VALUES)
    elif op == "rename" and isinstance(parent, dict):
        parent[rng.choice(["../../etc/passwd", key + "_", key.upper() if isinstance(key, str) else "k"])] = \
            parent.pop(key)
    else:
        parent[key] = _DEEP.format(rng.choice([50, 100_000]))  # written out by _dumps
    return doc


_DEEP = "@@deep-{}@@"


def _dumps(doc) -> bytes:
    """JSON text; a `_DEEP` marker becomes that many nested lists (deeper than json.dumps can write)."""
    text = json.dumps(doc, ensure_ascii=False)
    while (start := text.find('"@@deep-')) >= 0:
        end = text.index('@@"', start + 8)
        depth = int(text[start + 8:end])
        text = text[:start] + "[" * depth + "0" + "]" * depth + text[end + 3:]
    return text.encode("utf-8", "surrogatepass")


# ---------------------------------------------------------------- tests

def test_pristine_copy_loads(work):
    assert check_case(work, "unchanged copy") == "ok"


@pytest.mark.parametrize("rel", JSON_FILES)
def test_structural_mutations_of_json_files(work, rel):
    bundle = Bundle(work)
    rng = random.Random(f"{SEED}-{rel}")
    doc = json.loads(bundle.pristine[rel])
    outcomes = []
    try:
        for i in range(CASES_PER_FILE):
            mutated = _mutate(doc, rng)
            bundle.write(rel, _dumps(mutated))
            outcomes.append(check_case(work, f"{rel} mutation {i}: {str(mutated)[:300]}", checksums=False))
            bundle.restore()
    finally:
        bundle.restore()
    assert "refused" in outcomes  # the fuzzer reaches the checks


@pytest.mark.parametrize("rel", JSON_FILES + TEXT_FILES)
def test_byte_mutations(work, rel):
    """Truncation, flipped bytes, invalid UTF-8, NUL bytes, a huge line."""
    bundle = Bundle(work)
    rng = random.Random(f"{SEED}-bytes-{rel}")
    data = bundle.pristine[rel]
    try:
        for i in range(CASES_PER_FILE // 2):
            kind = rng.choice(["truncate", "flip", "utf8", "nul", "huge", "empty"])
            if kind == "truncate":
                mutated = data[:rng.randrange(len(data))]
            elif kind == "flip":
                mutated = bytearray(data)
                for _ in range(rng.randint(1, 8)):
                    mutated[rng.randrange(len(mutated))] = rng.randrange(256)
                mutated = bytes(mutated)
            elif kind == "utf8":
                at = rng.randrange(len(data))
                mutated = data[:at] + b"\xff\xfe\xc3" + data[at:]
            elif kind == "nul":
                at = rng.randrange(len(data))
                mutated = data[:at] + b"\x00" * 4 + data[at:]
            elif kind == "huge":
                at = rng.randrange(len(data))
                mutated = data[:at] + b"a" * 2_000_000 + data[at:]
            else:
                mutated = b""
            bundle.write(rel, mutated)
            check_case(work, f"{rel} byte mutation {i} ({kind})", checksums=False)
            bundle.restore()
    finally:
        bundle.restore()


@pytest.mark.parametrize("escape", ESCAPING_PATHS)
def test_file_entries_that_escape_the_bundle_are_refused(work, escape):
    bundle = Bundle(work)
    outside = work.parent / "outside.txt"
    manifest = copy.deepcopy(bundle.manifest)
    # The entry carries the outside file's true checksum: only a containment check keeps it out.
    manifest["files"][escape] = {"sha256": _sha(outside.read_bytes()), "size": outside.stat().st_size}
    manifest["components"]["unet"]["config"] = escape
    try:
        bundle.write("bundle.json", json.dumps(manifest).encode())
        assert check_case(work, f"files entry {escape!r}") == "refused"
    finally:
        bundle.restore()


@pytest.mark.parametrize("rel", ["tokenizer/vocab.json", "scheduler/scheduler_config.json", "unet/config.json"])
def test_symlinks_out_of_the_bundle_are_refused(work, rel):
    bundle = Bundle(work)
    target = work / rel
    saved = target.read_bytes()
    outside = work.parent / "outside_copy"
    outside.write_bytes(saved)  # same content and checksum: only the link itself is wrong
    target.unlink()
    target.symlink_to(outside)
    try:
        assert check_case(work, f"{rel} -> {outside}") == "refused"
    finally:
        target.unlink()
        target.write_bytes(saved)
        bundle.restore()


def test_a_symlink_loop_and_an_overlong_name_are_refused(work):
    bundle = Bundle(work)
    loop = work / "tokenizer" / "loop"
    loop.symlink_to(loop)
    manifest = copy.deepcopy(bundle.manifest)
    manifest["files"]["tokenizer/loop"] = {"sha256": "0" * 64, "size": 1}
    manifest["files"]["a" * 5000] = {"sha256": "0" * 64, "size": 1}
    try:
        for drop in ("a" * 5000, "tokenizer/loop"):
            bundle.write("bundle.json", json.dumps({**manifest, "files": {
                k: v for k, v in manifest["files"].items() if k != drop}}).encode())
            assert check_case(work, f"files without {drop[:10]}") == "refused"
    finally:
        loop.unlink()
        bundle.restore()


def test_a_symlinked_folder_out_of_the_bundle_is_refused(work):
    folder = work / "tokenizer"
    moved = work.parent / "tokenizer_elsewhere"
    shutil.move(folder, moved)
    folder.symlink_to(moved, target_is_directory=True)
    try:
        assert check_case(work, "tokenizer/ -> outside") == "refused"
    finally:
        folder.unlink()
        shutil.move(moved, folder)


def test_stale_checksums_are_refused_before_any_parser(work):
    bundle = Bundle(work)
    try:
        (work / "scheduler/scheduler_config.json").write_bytes(b"[[[[[[[[")
        with pytest.raises(BundleError, match="scheduler_config.json"):
            load_bundle(work)
    finally:
        bundle.restore()


# ---------------------------------------------------------------- graphs that differ from the manifest

def _rewrite_graph(root: Path, component: str, edit, check: bool = True) -> None:
    """Apply `edit` to a component's ONNX graph (still a valid graph) and update the manifest's entry."""
    onnx = pytest.importorskip("onnx")
    rel = f"{component}/model.onnx"
    model = onnx.load(str(root / rel))
    edit(model.graph)
    if check:
        onnx.checker.check_model(model)
    data = model.SerializeToString()
    (root / rel).write_bytes(data)
    manifest = json.loads((root / "bundle.json").read_text())
    manifest["files"][rel] = {"sha256": _sha(data), "size": len(data)}
    (root / "bundle.json").write_text(json.dumps(manifest))


def _rename_input(old: str, new: str):
    def edit(graph):
        for tensor in graph.input:
            if tensor.name == old:
                tensor.name = new
        for node in graph.node:
            node.input[:] = [new if name == old else name for name in node.input]
    return edit


def _rename_output(old: str, new: str):
    def edit(graph):
        for tensor in graph.output:
            if tensor.name == old:
                tensor.name = new
        for node in graph.node:
            node.output[:] = [new if name == old else name for name in node.output]
    return edit


def _fix_dim(tensor_name: str, axis: int, value: int):
    def edit(graph):
        tensor = next(t for t in list(graph.input) + list(graph.output) if t.name == tensor_name)
        dim = tensor.type.tensor_type.shape.dim[axis]
        dim.ClearField("dim_param")
        dim.dim_value = value
    return edit


GRAPH_EDITS = {
    "unet input renamed": ("unet", _rename_input("sample", "latents")),
    "unet batch fixed to 1": ("unet", _fix_dim("sample", 0, 1)),
    "text encoder length 76": ("text_encoder", _fix_dim("input_ids", 1, 76)),
    "vae output renamed": ("vae_decoder", _rename_output("sample", "image")),
}


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("case", list(GRAPH_EDITS))
def test_a_graph_that_differs_from_the_manifest_is_refused_at_load(tmp_path, case, backend):
    """A valid graph with other input names or shapes than bundle.json declares: a BundleError when the
    pipeline opens it, naming the graph file, instead of an error inside a generation."""
    from lcm_edge import AnimateLCMPipeline

    if backend == "openvino":
        pytest.importorskip("openvino")
    root = tmp_path / "bundle"
    shutil.copytree(default_bundle_path(), root)
    component, edit = GRAPH_EDITS[case]
    _rewrite_graph(root, component, edit)
    with pytest.raises(BundleError) as info:
        AnimateLCMPipeline.from_bundle(root, backend=backend)
    assert info.value.path.endswith(f"{component}/model.onnx"), info.value


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_graph_whose_external_data_lies_outside_the_bundle_is_refused(tmp_path, backend):
    """ONNX external data is a path inside the graph file; one that leads out of the bundle folder is a
    BundleError (both runtimes refuse to read it), never a read of that file."""
    from lcm_edge import AnimateLCMPipeline

    onnx = pytest.importorskip("onnx")
    if backend == "openvino":
        pytest.importorskip("openvino")
    root = tmp_path / "bundle"
    shutil.copytree(default_bundle_path(), root)

    def to_outside(graph):
        tensor = max(graph.initializer, key=lambda t: len(t.raw_data))
        (tmp_path / "outside.bin").write_bytes(tensor.raw_data)
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", "../../outside.bin"), ("offset", "0"),
                           ("length", str((tmp_path / "outside.bin").stat().st_size))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value

    _rewrite_graph(root, "vae_decoder", to_outside, check=False)  # onnx's checker refuses it too
    with pytest.raises(BundleError) as info:
        AnimateLCMPipeline.from_bundle(root, backend=backend)
    assert info.value.path.endswith("vae_decoder/model.onnx"), info.value

"""Faults: writers killed with SIGKILL at chosen points, a full disk, a read-only folder.

Each kill point is hit deterministically: the child script (written below, test-only) replaces the function
of that stage with one that sends its own process SIGKILL when entered. Product code has no test hooks.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lcm_edge import atomic_output
from lcm_edge.errors import InvalidArgumentError, OutputWriteError
from lcm_edge.video import save_video

TESTS = Path(__file__).resolve().parent
POSIX = hasattr(os, "fork")
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent / "benchmarks")])}


def _run_child(script: str, *args: str, timeout: int = 300) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          env=CHILD_ENV, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(line[len("REPORT "):]) for line in proc.stdout.splitlines() if line.startswith("REPORT ")]


# ------------------------------------------------------------------ export killed

EXPORT_CHILD = """
import json, os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from clip_vocab import write_sd15_tokenizer
from tiny_models import make_tiny_components
import lcm_edge.export.bundle_writer as bw
import lcm_edge.export.graph_export as ge
from lcm_edge import atomic_output
from lcm_edge.bundle import load_bundle
from lcm_edge.errors import BundleError

work = Path(sys.argv[1])
target = work / "bundle"
c = make_tiny_components(write_sd15_tokenizer(work / "tokenizer"))


def export(**kw):
    return bw.export_bundle(target, unet=c["unet"], vae=c["vae"], text_encoder=c["text_encoder"],
                            tokenizer=c["tokenizer"], scheduler_config=dict(c["scheduler"].config),
                            default_frames=4, **kw)


def die(*_, **__):
    os.kill(os.getpid(), signal.SIGKILL)


def kill_on_partial_replace():
    # Replacing a bundle, the old one was already moved aside when this rename comes.
    real = os.replace
    def replace(src, dst):
        if ".partial-" in Path(src).name:
            die()
        return real(src, dst)
    os.replace = replace


POINTS = {
    "tracing": (lambda: setattr(ge, "trace_onnx", die), {}),
    "parity gates": (lambda: setattr(ge, "check_parity", die), {}),
    "openvino conversion": (lambda: setattr(ge, "convert_to_openvino", die), {"openvino": True}),
    "rerun": (lambda: None, {}),
    "final rename, replacing a bundle": (kill_on_partial_replace, {"overwrite": True}),
}


def listing():
    return sorted(p.name for p in work.iterdir() if p.name.startswith((".bundle", "bundle")))


for point, (arm, kw) in POINTS.items():
    pid = os.fork()
    if pid == 0:
        arm()
        export(**kw)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    row = {"point": point, "killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL,
           "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None, "after": listing()}
    partials = [work / n for n in row["after"] if ".partial-" in n and not n.endswith(".lock")]
    row["partial_refused"] = []
    for folder in partials:
        if (folder / "bundle.json").is_file():
            try:
                load_bundle(folder)
                row["partial_refused"].append(False)
            except BundleError:
                row["partial_refused"].append(True)
    if point == "rerun":
        row["bundle_json"] = (target / "bundle.json").read_text()
    print("REPORT " + json.dumps(row), flush=True)

restored = atomic_output.recover(target)
row = {"point": "recover", "restored": [p.name for p in restored], "after": listing(),
       "bundle_json": (target / "bundle.json").read_text()}
load_bundle(target)
print("REPORT " + json.dumps(row), flush=True)
"""


@pytest.mark.skipif(not POSIX, reason="needs fork and SIGKILL")
def test_export_killed_at_each_stage_leaves_no_bundle_and_the_next_export_cleans_up(tmp_path):
    rows = {row["point"]: row for row in _run_child(EXPORT_CHILD, str(tmp_path))}
    for point in ("tracing", "parity gates", "openvino conversion"):
        row = rows[point]
        assert row["killed"], row
        assert "bundle" not in row["after"], row  # nothing under the target's name
        # Only the killed export's own temporary folder (and its lock) is left: the one before it was removed
        # by this export's start.
        partials = [n for n in row["after"] if ".partial-" in n]
        assert len([n for n in partials if not n.endswith(".lock")]) == 1, row
        assert all(n.startswith(".bundle.partial-") for n in row["after"]), row
    rerun = rows["rerun"]
    assert rerun["exit"] == 0 and rerun["after"] == ["bundle"], rerun  # leftovers gone, bundle in place

    replacing = rows["final rename, replacing a bundle"]
    assert replacing["killed"] and "bundle" not in replacing["after"], replacing
    assert any(n.startswith(".bundle.old-") for n in replacing["after"]), replacing
    # Killed on the rename, the temporary folder holds a complete manifest; it is still never loaded as a bundle.
    assert replacing["partial_refused"] == [True]
    # The next writer to that target (here recover() alone, which export_bundle runs first) puts the previous
    # bundle back: the interrupted replace never happened.
    recovered = rows["recover"]
    assert recovered["after"] == ["bundle"], recovered
    assert recovered["bundle_json"] == rerun["bundle_json"]


# ------------------------------------------------------------------ claims of live and dead writers

@pytest.mark.skipif(not POSIX, reason="needs fork")
def test_recover_removes_a_dead_writers_leftovers_but_never_a_live_writers(tmp_path):
    target = tmp_path / "out"
    live = atomic_output.Partial(target)
    live.path.mkdir()
    (live.path / "part").write_text("x")

    pid = os.fork()
    if pid == 0:  # a writer killed mid-write
        dead = atomic_output.Partial(target)
        dead.path.mkdir()
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 4  # two temporary folders, two locks

    removed = atomic_output.recover(target)
    assert len(removed) == 1 and removed[0] != live.path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.path.name, live.lock.name])
    # Names that only look alike (another target, a user's own hidden folder) are never touched.
    (tmp_path / ".out2.partial-0123456789ab").mkdir()
    (tmp_path / ".out.partial-notatoken").mkdir()
    assert atomic_output.recover(target) == []
    live.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial-notatoken", ".out2.partial-0123456789ab"]


# ------------------------------------------------------------------ generate killed mid-write

GENERATE_CHILD = """
import os, signal, sys
import cv2
from lcm_edge import cli

RealWriter = cv2.VideoWriter


class KilledMidWrite:
    # OpenCV's writer, killed after half the frames went to disk.
    def __init__(self, *args):
        self._writer, self._n = RealWriter(*args), 0

    def isOpened(self):
        return self._writer.isOpened()

    def write(self, frame):
        self._writer.write(frame)
        self._n += 1
        if self._n == 8:
            os.kill(os.getpid(), signal.SIGKILL)

    def release(self):
        self._writer.release()


cv2.VideoWriter = KilledMidWrite
sys.exit(cli.main(["generate", "a red circle moving right", "--frames", "16", "--seed", "1", "-o", sys.argv[1]]))
"""


@pytest.mark.skipif(not POSIX, reason="needs SIGKILL")
def test_generate_killed_mid_write_leaves_no_clip_and_the_next_save_cleans_up(tmp_path):
    clip = tmp_path / "clip.mp4"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(GENERATE_CHILD), str(clip)], capture_output=True,
                          text=True, env=CHILD_ENV, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not clip.exists()
    leftovers = sorted(tmp_path.iterdir())
    temps = [p for p in leftovers if p.suffix == ".mp4"]
    assert len(temps) == 1 and temps[0].name.startswith(".clip.mp4.partial-") and temps[0].stat().st_size > 0

    frames = np.zeros((4, 32, 32, 3), np.uint8)
    save_video(frames, clip, fps=4)
    assert clip.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


# ------------------------------------------------------------------ disk full, read-only folder

def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_save_on_a_full_disk_is_typed_and_leaves_the_target_untouched(tmp_path, monkeypatch, suffix):
    import lcm_edge.video as video

    clip = tmp_path / f"clip{suffix}"
    clip.write_bytes(b"the previous clip")
    monkeypatch.setattr(video, f"_write_{suffix[1:]}", _enospc)
    with pytest.raises(OutputWriteError) as info:
        save_video(np.zeros((2, 16, 16, 3), np.uint8), clip, fps=4)
    assert info.value.path == str(clip) and "No space left" in str(info.value)
    assert isinstance(info.value, OSError)  # callers that catch OSError still do
    assert clip.read_bytes() == b"the previous clip"
    assert sorted(p.name for p in tmp_path.iterdir()) == [clip.name]


def _read_only_folder(tmp_path: Path, monkeypatch) -> Path:
    """A folder writes fail in: chmod where that binds the user; as root (which chmod does not stop) the
    filesystem calls answer EROFS, as a read-only mount does."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return folder
    real_open, real_mkdir = os.open, os.mkdir

    def guarded(real):
        def call(path, *args, **kwargs):
            if Path(os.fsdecode(path)).resolve().parent == folder.resolve():
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
            return real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "open", guarded(real_open))
    monkeypatch.setattr(os, "mkdir", guarded(real_mkdir))
    return folder


def test_save_into_a_read_only_folder_is_typed(tmp_path, monkeypatch):
    folder = _read_only_folder(tmp_path, monkeypatch)
    with pytest.raises(OutputWriteError) as info:
        save_video(np.zeros((2, 16, 16, 3), np.uint8), folder / "clip.gif", fps=4)
    assert "clip.gif" in info.value.path
    assert list(folder.iterdir()) == []


def test_export_into_a_read_only_folder_fails_before_any_work(tmp_path, monkeypatch, tiny_components):
    from lcm_edge.export import export_bundle
    import lcm_edge.export.graph_export as ge

    folder = _read_only_folder(tmp_path, monkeypatch)
    monkeypatch.setattr(ge, "trace_onnx", lambda *a, **k: pytest.fail("export traced into a read-only folder"))
    c = tiny_components
    with pytest.raises(InvalidArgumentError) as info:
        export_bundle(folder / "bundle", unet=c["unet"], vae=c["vae"], text_encoder=c["text_encoder"],
                      tokenizer=c["tokenizer"], scheduler_config=dict(c["scheduler"].config))
    assert info.value.argument == "out" and "not writable" in info.value.problem
    assert list(folder.iterdir()) == []


def test_export_on_a_full_disk_is_typed_and_leaves_the_target_untouched(tmp_path, monkeypatch, tiny_components):
    from lcm_edge.export import export_bundle
    import lcm_edge.export.graph_export as ge

    target = tmp_path / "bundle"
    target.mkdir()
    (target / "bundle.json").write_text("the previous bundle")
    monkeypatch.setattr(ge, "trace_onnx", _enospc)  # the disk fills up as the first graph is written
    c = tiny_components
    with pytest.raises(OutputWriteError) as info:
        export_bundle(target, unet=c["unet"], vae=c["vae"], text_encoder=c["text_encoder"],
                      tokenizer=c["tokenizer"], scheduler_config=dict(c["scheduler"].config), default_frames=4,
                      overwrite=True)
    assert isinstance(info.value, OSError) and "No space left" in str(info.value)
    assert info.value.path == str(target)
    assert (target / "bundle.json").read_text() == "the previous bundle"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]

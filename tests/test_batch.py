"""`lcm-edge batch` on the default model: bad lines by number, resume, results.jsonl, worker processes, Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from lcm_edge.batch import RESULTS_FILE
from lcm_edge.cli import main

# Small clips keep the batch tests fast; the pipeline is the same at any size.
GOOD = [{"prompt": "a red circle moving right", "seed": 1, "frames": 8, "steps": 2},
        {"prompt": "a blue square moving up", "seed": 2, "frames": 4, "steps": 1, "guidance": 1.5,
         "negative_prompt": "a red circle"},
        # longer than the default model's text encoder takes: the record says what was dropped
        {"prompt": "a green triangle moving left" + " and a blue square moving up" * 3, "frames": 4, "steps": 1,
         "height": 32, "width": 32}]
pytestmark = pytest.mark.filterwarnings("ignore::lcm_edge.PromptTruncatedWarning")


def _write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def _frames(clip: Path) -> tuple[int, int, int]:
    capture = cv2.VideoCapture(str(clip))
    count, shape = 0, None
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        count, shape = count + 1, frame.shape
    capture.release()
    return count, shape[0], shape[1]


def _results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / RESULTS_FILE).read_text().splitlines()]


def _check_clips(out: Path, jobs: dict[int, dict]) -> list[dict]:
    """Every job's clip is there with its frames and size, and results.jsonl has its line."""
    results = _results(out)
    assert sorted(r["line"] for r in results) == sorted(jobs)
    for record in results:
        job = jobs[record["line"]]
        assert _frames(out / record["file"]) == (job["frames"], job.get("height", 64), job.get("width", 64))
        assert record["frames"] == job["frames"] and len(record["timings"]["unet_steps_s"]) == job["steps"]
        assert isinstance(record["seed"], int) and record["seed"] == job.get("seed", record["seed"])
    # Nothing half-written: only finished clips and the results file.
    assert sorted(p.name for p in out.iterdir()) == sorted([r["file"] for r in results] + [RESULTS_FILE])
    return results


def test_batch_reports_bad_lines_skips_them_and_resumes(tmp_path, capsys):
    prompts = _write(tmp_path / "prompts.jsonl", [GOOD[0], "{not json", GOOD[1], {"prompt": "x", "frames": 999},
                                                  GOOD[2], {"prompt": "x", "colour": "red"}])
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--out", str(out)]) == 1  # clips made, bad lines reported
    err = capsys.readouterr().err
    assert "line 2: not JSON" in err
    assert "line 4: frames: 999 is outside [1, 32]. Fix:" in err
    assert "line 6: unknown keys ['colour']" in err
    first = _check_clips(out, {1: GOOD[0], 3: GOOD[1], 5: GOOD[2]})
    assert all(r["worker"].endswith(f":{os.getpid()}") for r in first)  # one worker: this process
    assert [bool(r.get("truncated_text")) for r in first] == [False, False, True]

    # A rerun makes nothing: every clip is there.
    assert main(["batch", str(prompts), "--out", str(out)]) == 1
    assert "3 already in" in capsys.readouterr().err
    assert _results(out) == first

    # An interrupted batch (one clip missing) makes only what is missing.
    (out / first[1]["file"]).unlink()
    assert main(["batch", str(prompts), "--out", str(out)]) == 1
    assert "2 already in" in capsys.readouterr().err and len(_results(out)) == 4


def test_batch_on_error_stop_stops_before_any_clip(tmp_path, capsys):
    prompts = _write(tmp_path / "prompts.jsonl", [GOOD[0], {"prompt": "x", "steps": 0}])
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--out", str(out), "--on-error", "stop"]) == 2
    assert f"error: {prompts}:2: steps: 0 is outside" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_batch_worker_processes(tmp_path):
    prompts = _write(tmp_path / "prompts.jsonl", ["", GOOD[0], "", GOOD[1], "", GOOD[2]])  # blank lines count
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--out", str(out), "--workers", "2"]) == 0
    results = _check_clips(out, {2: GOOD[0], 4: GOOD[1], 6: GOOD[2]})
    assert all(not r["worker"].endswith(f":{os.getpid()}") for r in results)  # made in the worker processes


def test_batch_on_a_local_ray_cluster(tmp_path):
    import ray  # the [ray] extra; [dev] installs it, so a missing one fails here rather than skipping

    prompts = _write(tmp_path / "prompts.jsonl", GOOD)
    out = tmp_path / "out"
    # A local cluster in this process (2 CPUs, no dashboard); `--ray auto` then uses it, as it would use the
    # cluster of `ray start --head`.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert main(["batch", str(prompts), "--out", str(out), "--ray", "auto", "--workers", "3"]) == 2  # > 2 CPUs
        assert not out.exists() or not any(out.iterdir())
        assert main(["batch", str(prompts), "--out", str(out), "--ray", "auto", "--workers", "2"]) == 0
    finally:
        ray.shutdown()
    results = _check_clips(out, {1: GOOD[0], 2: GOOD[1], 3: GOOD[2]})
    assert all(not r["worker"].endswith(f":{os.getpid()}") for r in results)  # made in the Ray actors


def test_package_and_cli_import_neither_gradio_nor_ray():
    code = ("import sys, lcm_edge, lcm_edge.cli, lcm_edge.batch; lcm_edge.cli.build_parser(); "
            "print(sorted(m for m in ('gradio', 'ray', 'PySide6') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr

"""Soak: threads sharing one pipeline for many generations, per backend (issue 27 §1).

    python benchmarks/soak.py [--bundle DIR] [--backend onnxruntime openvino] [--threads 4] [--rounds 25]
        [--frames F] [--height H] [--width W]
    python benchmarks/soak.py --compare-requests [--calls 3]

Each backend runs in its own subprocess. Reference clips come first from serial calls; then in each round
every thread makes one generation (seed = generation index mod the reference count), so a thread-safety
fault shows up as a frame difference or an error. Prints the errors (by type), how many clips equal the
serial ones, and RSS after the first round and after the last (target: within 5%).
--compare-requests times threads x calls on OpenVINO with one infer request per compiled graph (callers
queue: a lock) against a pool of one request per thread, the measurement behind MAX_INFER_REQUESTS.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

PROMPTS = ("a red circle moving right", "a blue square moving up", "a yellow triangle moving left",
           "a white circle moving down")
REFERENCES = 8  # distinct seeds; generation i uses seed i % REFERENCES


def rss_mib() -> float:
    with open("/proc/self/statm") as f:  # Linux: resident pages are the second field
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def soak(bundle: str, backend: str, threads: int, rounds: int, size: dict) -> dict:
    import numpy as np

    import lcm_edge

    pipe = lcm_edge.AnimateLCMPipeline.from_bundle(bundle, backend=backend)
    job = lambda i: pipe(PROMPTS[i % len(PROMPTS)], seed=i % REFERENCES, **size).frames  # noqa: E731
    reference = [job(i) for i in range(REFERENCES)]
    errors, identical, rss, count = collections.Counter(), 0, [], 0
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for r in range(rounds):
            indices = list(range(count, count + threads))
            futures = [pool.submit(job, i) for i in indices]
            for i, future in zip(indices, futures):
                try:
                    identical += bool(np.array_equal(future.result(), reference[i % REFERENCES]))
                except Exception as exc:  # counted and reported: the soak's purpose is to find these
                    errors[f"{type(exc).__name__}: {exc}"[:200]] += 1
            count += threads
            if r == 0:
                rss.append(rss_mib())
    rss.append(rss_mib())
    return {"backend": pipe.backend.describe(), "generations": count, "errors": dict(errors),
            "identical_to_serial": identical, "rss_first_round_mib": rss[0], "rss_end_mib": rss[-1],
            "seconds": time.perf_counter() - start}


def compare_requests(bundle: str, threads: int, calls: int, size: dict) -> list[dict]:
    import lcm_edge

    rows = []
    for requests in (1, threads):
        pipe = lcm_edge.AnimateLCMPipeline.from_bundle(bundle, backend="openvino", max_infer_requests=requests)
        pipe(PROMPTS[0], seed=0, **size)  # compile outside the timing
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(lambda i: pipe(PROMPTS[i % len(PROMPTS)], seed=i, **size), range(threads * calls)))
        rows.append({"max_infer_requests": requests, "seconds": time.perf_counter() - start, "rss_mib": rss_mib()})
    return rows


def run_child(args, *extra: str) -> dict | list:
    command = [sys.executable, __file__, "--threads", str(args.threads), "--rounds", str(args.rounds),
               "--calls", str(args.calls), *extra]
    if args.bundle:
        command += ["--bundle", args.bundle]
    for flag in ("frames", "height", "width"):
        if getattr(args, flag) is not None:
            command += [f"--{flag}", str(getattr(args, flag))]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=None, help="default: the shipped bundle")
    parser.add_argument("--backend", nargs="+", default=["onnxruntime", "openvino"])
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=25, help="generations per thread")
    parser.add_argument("--calls", type=int, default=3, help="calls per thread with --compare-requests")
    parser.add_argument("--compare-requests", action="store_true")
    parser.add_argument("--frames", type=int, default=None, help="default: the bundle's")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        from lcm_edge.default import default_bundle_path

        bundle = args.bundle or str(default_bundle_path())
        size = {"num_frames": args.frames, "height": args.height, "width": args.width}
        if args.child == "compare":
            print(json.dumps(compare_requests(bundle, args.threads, args.calls, size)))
        else:
            print(json.dumps(soak(bundle, args.child, args.threads, args.rounds, size)))
        return 0
    if args.compare_requests:
        for row in run_child(args, "--child", "compare"):
            print(f"openvino, {args.threads} threads x {args.calls} calls, max_infer_requests="
                  f"{row['max_infer_requests']}: {row['seconds']:.2f} s, RSS {row['rss_mib']:.0f} MiB")
        return 0
    failed = False
    for backend in args.backend:
        row = run_child(args, "--child", backend)
        growth = row["rss_end_mib"] / row["rss_first_round_mib"] - 1
        failed |= bool(row["errors"]) or row["identical_to_serial"] != row["generations"] or growth > 0.05
        print(f"{row['backend']}: {row['generations']} generations ({args.threads} threads x {args.rounds}) in "
              f"{row['seconds']:.1f} s; errors {sum(row['errors'].values())} {row['errors'] or ''}; identical to "
              f"serial {row['identical_to_serial']}/{row['generations']}; RSS after first round "
              f"{row['rss_first_round_mib']:.0f} MiB, after soak {row['rss_end_mib']:.0f} MiB ({growth:+.1%})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""`lcm-edge bench`: one benchmark for every runtime, precision and device, with PyTorch beside it.

    from lcm_edge.bench import BenchOptions, expand_matrix, run_bench
    doc = run_bench(expand_matrix(bundles=["default"], runtimes=["onnxruntime:cpu", "openvino:CPU"],
                                  sizes=["64x64x16"]), BenchOptions(out=Path("bench-results")))

Torch-free like the rest of the runtime; the PyTorch rows run in their own processes and need the
[export] extra, the plots the [bench] extra.
"""

from .runner import BenchOptions, frame_fidelity, run_bench
from .scenarios import Runtime, Scenario, expand_matrix, load_scenario_file, parse_runtime, parse_size

__all__ = ["BenchOptions", "Runtime", "Scenario", "expand_matrix", "frame_fidelity", "load_scenario_file",
           "parse_runtime", "parse_size", "run_bench"]

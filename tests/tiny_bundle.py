"""Export the tiny random-weight AnimateLCM-architecture model used by the tests to a bundle.

    python tests/tiny_bundle.py OUT_DIR [--openvino]

Needs the [export] extra. The weights are random, so the clip it makes is coloured noise:
it exists to exercise and time the whole export -> runtime path on any machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the fixtures beside it
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the CLIP vocabulary builder

from clip_vocab import write_sd15_tokenizer  # noqa: E402
from tiny_models import make_tiny_components  # noqa: E402

from lcm_edge.export import export_bundle  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--openvino", action="store_true", help="also write OpenVINO IR")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        c = make_tiny_components(write_sd15_tokenizer(Path(tmp) / "tokenizer"))
        report = export_bundle(args.out, unet=c["unet"], vae=c["vae"], text_encoder=c["text_encoder"],
                               tokenizer=c["tokenizer"], scheduler_config=dict(c["scheduler"].config),
                               openvino=args.openvino, overwrite=args.overwrite,
                               provenance={"model": "tiny random-weight test model (tests/tiny_bundle.py)"})
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())

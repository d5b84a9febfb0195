"""`python -m lcm_edge.distill image|video|adapter --config FILE` (also under `accelerate launch -m`)."""

import sys

from .cli import main

sys.exit(main())

"""lcm_edge.distill: decoupled consistency learning (AnimateLCM) on Hugging Face Accelerate."""

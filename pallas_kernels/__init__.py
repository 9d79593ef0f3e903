"""Raw Pallas kernels (no Flax). The gated delta rule and dynamic conv kernels land here (issues 4, 5)."""

"""Pallas kernels of JetBlock's generated causal convolution: `gpu` (Triton) and `tpu` (Mosaic)."""

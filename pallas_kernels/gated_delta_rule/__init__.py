"""Pallas kernels of the chunked gated delta rule: `tpu` (Mosaic TPU: forward, chunk states, backward) and
`gpu` (Triton lowering: forward and backward pipelines)."""

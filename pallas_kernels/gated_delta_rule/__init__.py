"""Pallas kernels of the chunked gated delta rule, one module per backend, each with its layout and custom VJP:
`tpu` (Mosaic TPU: forward, chunk states, backward) and `triton` (Pallas GPU through Triton; kernels in
`triton_forward` and `triton_backward`)."""

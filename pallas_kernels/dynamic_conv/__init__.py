"""Pallas kernels of JetBlock's generated causal convolution, one module per backend: `tpu` (Mosaic TPU),
`triton` (Pallas GPU through Triton) and `mosaic_gpu` (Mosaic GPU, sm_90; `mosaic_gpu_backward`,
`mosaic_gpu_pipeline`); `layout` (their shared layout and custom VJP) and `common` (their shared tile math)."""

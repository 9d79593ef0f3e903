"""Raw Pallas kernels (jax only, no Flax), one folder per op and one module per backend; the ops that run them
are in `jetnemo_jax.ops` (docs/architecture.md)."""

# The name (jax.ad_checkpoint.checkpoint_name) on the outputs and residuals of the kernels' custom-VJP forwards:
# a remat policy that saves it keeps them for the backward instead of running the forward kernels again.
KERNEL_RESIDUALS = "kernel_residuals"

"""Raw Pallas kernels (jax only, no Flax), one folder per op and one module per backend; the ops that run them
are in `jetnemo_jax.ops` (docs/architecture.md)."""

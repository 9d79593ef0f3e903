"""Ops with an `impl` switch, one module per op: the gated delta rule (`delta_rule`) and JetBlock's dynamic
causal convolution (`conv`); each holds its public functions, reference, pure-XLA path and table of backends
(`backends`), whose kernels live in `pallas_kernels/<op>/`. Also the gated linear attention of the PostNAS
blocks (`linear_attention`), packed-document helpers (`documents`) and the kernels' mesh (`mesh`)."""

from jetnemo_jax.ops.backends import IMPLS
from jetnemo_jax.ops.conv import dynamic_conv, dynamic_conv_step, generated_dynamic_conv
from jetnemo_jax.ops.delta_rule import gated_delta_rule, gated_delta_rule_step, l2_normalize
from jetnemo_jax.ops.documents import doc_ids_from_segments, positions_in_documents
from pallas_kernels import KERNEL_RESIDUALS

__all__ = ["IMPLS", "KERNEL_RESIDUALS", "doc_ids_from_segments", "dynamic_conv", "dynamic_conv_step",
           "gated_delta_rule", "gated_delta_rule_step", "generated_dynamic_conv", "l2_normalize",
           "positions_in_documents"]

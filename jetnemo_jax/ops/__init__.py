"""Ops with an `impl` switch: the gated delta rule and JetBlock's generated causal convolution."""

from jetnemo_jax.ops.dispatch import (
                                      dynamic_conv,
                                      dynamic_conv_step,
                                      gated_delta_rule,
                                      gated_delta_rule_step,
                                      generated_dynamic_conv,
                                      l2_normalize,
)

__all__ = ["dynamic_conv", "dynamic_conv_step", "gated_delta_rule", "gated_delta_rule_step", "generated_dynamic_conv",
           "l2_normalize"]

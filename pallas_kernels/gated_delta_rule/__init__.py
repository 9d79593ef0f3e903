"""Mosaic TPU (Pallas) kernels for the chunked gated delta rule: forward, chunk states, backward."""

from pallas_kernels.gated_delta_rule.kernel import CHUNK, backward, chunk_states, forward

__all__ = ["CHUNK", "forward", "chunk_states", "backward"]

"""Flax NNX layers. Attribute names follow the PyTorch state-dict names (q_proj, o_norm, ...)."""

"""Deprecated module path (model.py still imports it): use `jetnemo_jax.ops.positions_in_documents`."""

from jetnemo_jax.ops.documents import positions_in_documents

__all__ = ["positions_in_documents"]

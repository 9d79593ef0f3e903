"""Deprecated module path (model.py still imports it): use `jetnemo_jax.ops.doc_ids_from_segments`."""

from jetnemo_jax.ops.documents import doc_ids_from_segments

__all__ = ["doc_ids_from_segments"]

"""PostNAS: the search that produced Jet-Nemotron (paper section 4), at any scale.

supernet.py  once-for-all super-network (frozen attention or a trainable linear path per layer)
evaluators.py  task scores of a placement: LM loss, multiple-choice answer loss, retrieval accuracy
search.py  beam search over full-attention placements, exhaustive search, per-layer importance
blocks.py  candidate linear-attention blocks; hardware.py  the (dk, dv, heads) grid at fixed state size
tasks.py  evaluation and distillation data; handoff.py  the searched config for train.py
pipeline.py (+ config.py, report.py)  the four steps end to end:
    python -m jetnemo_jax.nas --config configs/postnas_tiny.py     (see docs/postnas.md)
"""

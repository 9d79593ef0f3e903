"""Training data: text sources, tokenizers, grain pipelines with packing and segment ids."""

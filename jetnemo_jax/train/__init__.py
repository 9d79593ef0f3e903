"""Continued pretraining: config, trainable/frozen split, optimiser, step, distillation, metrics, loop."""

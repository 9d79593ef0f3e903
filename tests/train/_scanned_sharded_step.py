"""Child process of test_scan_step.py: three train steps of the scanned model (model.scan_layers) on a 2x2x2
(data, fsdp, tensor) mesh of 8 simulated CPU devices against the unrolled model's on one device."""

from tests.train._sharded_step import random_batches, rel, steps  # noqa: I001 (first: it sets XLA_FLAGS before JAX starts)

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main(seed):
    batches = random_batches(seed)
    devs = jax.devices()
    # Runs of 2 JetBlocks, 2 sliding-window and 2 full-attention layers, under stage-1 style freezing.
    common = {"train.remat": "jet:dots,attn:full,swa:none", "train.frozen": "/mlp/|embed_tokens",
              "model.layer_types": ("jet", "jet", "swa", "swa", "attn", "attn")}
    loss1, p1, _, moved = steps({"data": 1, "fsdp": 1, "tensor": 1}, devs[:1], batches, **common)
    loss8, p8, specs, _ = steps({"data": 2, "fsdp": 2, "tensor": 2}, devs, batches, **common,
                                **{"model.scan_layers": True})
    out = {"loss_rel_8": float(np.abs(loss8 / loss1 - 1).max()), "min_param_change": moved,
           "param_rel_8": max(rel(p8[n], p1[n]) for n in p1),
           "sharded_params": sum(s != ["None"] * len(s) for s in specs.values()), "n_params": len(specs)}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(int(sys.argv[1]))

"""Child process of test_sharded_step.py: three train steps on 1 device, on a 2x2x2 mesh of 8 simulated
CPU devices, and with gradient accumulation; prints a JSON comparison."""

import os

from tests.xla_flags import with_host_devices

os.environ["XLA_FLAGS"] = with_host_devices(8)

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from jetnemo_jax import sharding  # noqa: E402
from jetnemo_jax.train.loop import initial_params  # noqa: E402
from jetnemo_jax.train.program import build  # noqa: E402
from tests.train.runs import small_config  # noqa: E402


def steps(mesh_axes, devices, batches, **overrides):
    # Adam's first steps divide by |g|, which turns the rounding noise of near-zero gradients into full-size
    # updates; a large eps makes the update a smooth function of the gradient (SGD-like), so comparing
    # parameters compares gradients.
    c = small_config("/unused", **{"optim.warmup_steps": 0, "optim.eps": 1.0, "optim.lr": 0.3, **overrides})
    program = build(c, sharding.make_mesh(mesh_axes, devices))
    trainable, frozen, teacher = initial_params(c, program)
    init = {n: np.asarray(a) for n, a in trainable.items()}
    state = program.init_state(trainable)
    losses = []
    for batch in batches:
        placed = {k: jax.device_put(v, program.batch_sharding) for k, v in batch.items()}
        state, metrics = program.step_fn(state, frozen, teacher, placed)
        losses.append([float(metrics["loss"]), float(metrics["grad_norm"])])
    specs = {n: [str(x) for x in a.sharding.spec] for n, a in state["params"].items()}
    params = {n: np.asarray(a) for n, a in state["params"].items()}
    moved = min((float(np.abs(params[n] - init[n]).max()), n) for n in params)
    return np.asarray(losses), params, specs, moved


def rel(a, b):
    return float(np.sqrt(np.sum((a - b) ** 2) / max(np.sum(b ** 2), 1e-30)))


def random_batches(seed, n=3):
    """n batches of 8 rows x 32 random tokens, packed documents with random boundaries."""
    rng = np.random.default_rng(seed)
    return [{"tokens": rng.integers(0, 512, (8, 32)).astype(np.int32),
             "segment_ids": (np.cumsum(rng.random((8, 32)) < 0.08, axis=1) + 1).astype(np.int32)}
            for _ in range(n)]


def main(seed):
    batches = random_batches(seed)
    devs = jax.devices()
    one = {"data": 1, "fsdp": 1, "tensor": 1}
    loss1, p1, _, moved = steps(one, devs[:1], batches)
    loss8, p8, specs, _ = steps({"data": 2, "fsdp": 2, "tensor": 2}, devs, batches)
    loss_acc, p_acc, _, _ = steps(one, devs[:1], batches, **{"train.microbatches": 2})
    out = {
        "loss_1": loss1.tolist(), "loss_rel_8": float(np.abs(loss8 / loss1 - 1).max()),
        "loss_rel_accum": float(np.abs(loss_acc / loss1 - 1).max()), "min_param_change": moved,
        "param_rel_8": max(rel(p8[n], p1[n]) for n in p1),
        "param_rel_accum": max(rel(p_acc[n], p1[n]) for n in p1),
        "sharded_params": sum(s != ["None"] * len(s) for s in specs.values()), "n_params": len(specs),
        "embedding_spec": specs["model/embed_tokens/embedding"],
    }
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(int(sys.argv[1]))

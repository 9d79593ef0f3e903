"""Child process of test_context_parallel.py: train steps of the tiny hybrid (jet, attn, swa layers; window 64,
longer than a shard) with every sequence split over a `context` mesh axis of 8 simulated CPU devices, against
one device. Prints a JSON comparison."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from jetnemo_jax import sharding  # noqa: E402
from jetnemo_jax.train import step  # noqa: E402
from jetnemo_jax.train.loop import initial_params  # noqa: E402
from jetnemo_jax.train.program import build  # noqa: E402
from tests.train.runs import small_config  # noqa: E402

T = 72  # shards of 36, 18 and 9 tokens: none a multiple of the 64-token chunks


def steps(mesh_axes, batches, **overrides):
    """(losses [steps, 2] of train steps on `batches`, the gradient of every trainable parameter on the second
    batch after the first step, the token sharding)."""
    n = int(np.prod(list(mesh_axes.values())))
    # Adam with eps = 1 keeps steps 2 and 3 smooth functions of the gradients (its first steps divide by |g|).
    c = small_config("/unused", **{"optim.warmup_steps": 0, "optim.eps": 1.0, "optim.lr": 0.3, "data.seq_len": T,
                                   "data.global_batch": 4,
                                   **overrides})
    program = build(c, sharding.make_mesh(mesh_axes, jax.devices()[:n]))
    trainable, frozen, teacher = initial_params(c, program)
    placed = [{k: jax.device_put(v, program.batch_sharding) for k, v in b.items()} for b in batches]
    loss_fn = step.make_loss_fn(program.split, c, program.teacher, program.mesh)
    n_valid = jnp.sum(step.next_token_targets(batches[1]["tokens"], batches[1]["segment_ids"])[1]).astype(float)
    grad_fn = jax.jit(jax.grad(lambda p, f, t, b: loss_fn(p, f, t, b, n_valid)[0]))
    state = program.init_state(trainable)
    losses, grads = [], None
    for i, batch in enumerate(placed):
        if i == 1:  # after one step: the zero-initialised conv-kernel generator has moved, so all have gradients
            grads = {k: np.asarray(g) for k, g in grad_fn(state["params"], frozen, teacher, batch).items()}
        state, metrics = program.step_fn(state, frozen, teacher, batch)
        losses.append([float(metrics["loss"]), float(metrics["grad_norm"])])
    return np.asarray(losses), grads, str(program.batch_sharding.spec)


def rel(a, b):
    return float(np.sqrt(np.sum((a - b) ** 2) / max(np.sum(b ** 2), 1e-30)))


def segments(rng):
    """Packed documents: row 0 one document; row 1 random boundaries; rows 2 and 3 boundaries exactly on the
    shard edges of 2, 4 and 8 shards (9, 18, 36, 54) and just inside them."""
    seg = np.zeros((4, T), np.int32)
    seg[1] = np.cumsum(rng.random(T) < 0.08)
    for t in (9, 18, 36, 54):
        seg[2, t:] += 1
    for t in (10, 17, 35, 37, 63):
        seg[3, t:] += 1
    return seg + 1


def main(seed):
    rng = np.random.default_rng(seed)
    batches = [{"tokens": rng.integers(0, 512, (4, T)).astype(np.int32), "segment_ids": segments(rng)}
               for _ in range(3)]
    base_loss, base_grads, _ = steps({"data": 1, "fsdp": 1}, batches)
    out = {"loss_1": base_loss.tolist(), "n_grads": len(base_grads),
           "min_grad": min(float(np.abs(g).max()) for g in base_grads.values())}
    for name, axes, extra in (("context2", {"context": 2}, {}), ("context4", {"context": 4}, {}),
                              ("context8", {"context": 8}, {}), ("fsdp2_context4", {"fsdp": 2, "context": 4}, {}),
                              ("context4_blocked", {"context": 4}, {"model.attn_impl": "blocked"})):
        loss, grads, spec = steps({"data": 1, "fsdp": 1, **axes}, batches, **extra)
        worst = max((rel(grads[k], base_grads[k]), k) for k in base_grads)
        out[name] = {"loss_rel": float(np.abs(loss / base_loss - 1).max()), "grad_rel": worst[0],
                     "worst_param": worst[1], "token_spec": spec}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(int(sys.argv[1]))

"""Child process of test_context_parallel.py: the training loss and gradients of the tiny hybrid (a jet, an attn
and a swa layer; window 64, longer than a shard) with every sequence split over a `context` mesh axis of 8
simulated CPU devices, against one device. Prints a JSON comparison."""

import os

from tests.xla_flags import with_host_devices

os.environ["XLA_FLAGS"] = with_host_devices(8)

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


def loss_and_grads(mesh_axes, batch, **overrides):
    """(loss, the gradient of every parameter, the token sharding) of the tiny model's training loss on
    `batch`, its zero-initialised conv-kernel generators (w2) made random so that every parameter has one."""
    n = int(np.prod(list(mesh_axes.values())))
    c = small_config("/unused", **{"data.seq_len": T, "data.global_batch": 4,
                                   "model.layer_types": ("jet", "attn", "swa"), **overrides})
    program = build(c, sharding.make_mesh(mesh_axes, jax.devices()[:n]))
    trainable, frozen, teacher = initial_params(c, program)
    key = jax.random.key(0)
    trainable = {k: a + 0.05 * jax.random.normal(jax.random.fold_in(key, i), a.shape, a.dtype)
                 if "kernel_generator/w2" in k else a for i, (k, a) in enumerate(sorted(trainable.items()))}
    placed = {k: jax.device_put(v, program.batch_sharding) for k, v in batch.items()}
    loss_fn = step.make_loss_fn(program.split, c, program.teacher, program.mesh)
    n_valid = jnp.sum(step.next_token_targets(batch["tokens"], batch["segment_ids"])[1]).astype(float)
    loss, grads = jax.jit(jax.value_and_grad(lambda p, f, t, b: loss_fn(p, f, t, b, n_valid)[0]))(
        trainable, frozen, teacher, placed)
    return float(loss), {k: np.asarray(g) for k, g in grads.items()}, str(program.batch_sharding.spec)


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
    batch = {"tokens": rng.integers(0, 512, (4, T)).astype(np.int32), "segment_ids": segments(rng)}
    base_loss, base_grads, _ = loss_and_grads({"data": 1, "fsdp": 1}, batch)
    out = {"loss_1": base_loss, "n_grads": len(base_grads),
           "min_grad": min(float(np.abs(g).max()) for g in base_grads.values())}
    # context 8 (a window longer than a shard) and 4, with fsdp and with the blocked attention (the 2 shards'
    # edges are among 4's, and 4 alone adds nothing its two rows do not check)
    for name, axes, extra in (("context8", {"context": 8}, {}), ("fsdp2_context4", {"fsdp": 2, "context": 4}, {}),
                              ("context4_blocked", {"context": 4}, {"model.attn_impl": "blocked"})):
        loss, grads, spec = loss_and_grads({"data": 1, "fsdp": 1, **axes}, batch, **extra)
        worst = max((rel(grads[k], base_grads[k]), k) for k in base_grads)
        out[name] = {"loss_rel": abs(loss / base_loss - 1), "grad_rel": worst[0], "worst_param": worst[1],
                     "token_spec": spec}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(int(sys.argv[1]))

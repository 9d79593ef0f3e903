"""Child process of test_context.py: the gated delta rule and the generated conv with every sequence split over
a `context` mesh axis of 8 simulated CPU devices, against one device; prints a JSON comparison."""

import os

from tests.xla_flags import with_host_devices

os.environ["XLA_FLAGS"] = with_host_devices(8)

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from jetnemo_jax import ops, sharding  # noqa: E402

MESHES = {"context4": {"context": 4}, "context8": {"context": 8},  # the edges of 2 shards are among 4's and 8's
          "fsdp2_context4": {"fsdp": 2, "context": 4}}


def rel(a, b):
    return float(jnp.linalg.norm((a - b).ravel()) / max(float(jnp.linalg.norm(b.ravel())), 1e-30))


def segments(T, rng):
    """Row 0: one document; row 1: boundaries exactly on the shard edges of 2, 4 and 8 shards and just
    inside them; row 2: random boundaries; row 3: a one-token document at every shard start."""
    seg = np.zeros((4, T), np.int32)
    for t in sorted({T // 8 * i for i in range(1, 8)} | {T // 8 * i + 1 for i in range(1, 8)}):
        seg[1, t:] += 1
    seg[2] = np.cumsum(rng.random(T) < 0.1)
    for t in range(0, T, T // 8):
        seg[3, t + 1:] += 1
    return jnp.asarray(seg)


def compare(f, args, impls):
    """{mesh: {impl: (value rel err, worst gradient rel err)}} against the one-device xla row."""
    run = lambda mesh, impl: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda *a: f(*a, impl=impl, mesh=mesh), argnums=tuple(range(len(args)))))(*args)
    v1, g1 = run(None, "xla")
    out = {}
    for name, axes in MESHES.items():
        n = int(np.prod(list(axes.values())))
        mesh = sharding.make_mesh(axes, jax.devices()[:n])
        out[name] = {}
        for impl in impls if name == "fsdp2_context4" else impls[:1]:  # the kernels: on the 4 shards with fsdp
            v, g = run(mesh, impl)
            out[name][impl] = [rel(v, v1), max(rel(a, b) for a, b in zip(g, g1))]
    return out


def main(seed):
    rng = np.random.default_rng(seed)
    key = iter(jax.random.split(jax.random.key(seed), 16))
    B, T, H, dk, dv = 4, 136, 2, 32, 64  # shards of 68, 34, 17 tokens: the 64-token chunks do not fit them
    q, k = jax.random.normal(next(key), (B, T, H, dk)), jax.random.normal(next(key), (B, T, H, dk))
    v = jax.random.normal(next(key), (B, T, H, dv))
    g = -jax.nn.softplus(3 * jax.random.normal(next(key), (B, T, H)))  # strong and weak decay
    g = g.at[:, :20].set(0.0)  # zero gates (no decay)
    beta = jax.nn.sigmoid(jax.random.normal(next(key), (B, T, H)))
    s0 = jax.random.normal(next(key), (B, H, dk, dv))
    seg = segments(T, rng)

    def gdr(q, k, v, g, beta, s0, *, impl, mesh):
        o, s = ops.gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True, segment_ids=seg,
                                    impl=impl, mesh=mesh)
        return jnp.sum(jnp.sin(o)) + jnp.sum(jnp.cos(s))

    D, G, W = 16, 8, 4
    u, h = jax.random.normal(next(key), (B, T, D)), jax.random.normal(next(key), (B, T, G))
    w2, b2 = jax.random.normal(next(key), (G, D * W)), jax.random.normal(next(key), (D * W,))
    cache = jax.random.normal(next(key), (B, W - 1, D))

    def conv(u, h, w2, b2, cache, *, impl, mesh):
        y, c = ops.generated_dynamic_conv(u, h, w2, b2, segment_ids=seg, cache=cache, output_final_cache=True,
                                          impl=impl, mesh=mesh)
        return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(c))

    with jax.set_mesh(sharding.make_mesh({"context": 2}, jax.devices()[:2])):
        jaxpr = str(jax.make_jaxpr(lambda *a: gdr(*a, impl="xla", mesh=None))(q, k, v, g, beta, s0))
    out = {"gdr": compare(gdr, (q, k, v, g, beta, s0), ("xla", "triton", "tpu", "reference")),
           "conv": compare(conv, (u, h, w2, b2, cache), ("xla", "triton", "tpu")),
           "hand_off_in_program": "all_gather" in jaxpr and "shard_map" in jaxpr}
    errors = {}
    mesh8 = sharding.make_mesh({"context": 8}, jax.devices())
    for name, call in (("T", lambda: ops.gated_delta_rule(q[:, :130], k[:, :130], v[:, :130], g[:, :130],
                                                          beta[:, :130], impl="xla", mesh=mesh8)),
                       ("halo", lambda: ops.generated_dynamic_conv(u[:, :16], h[:, :16], w2, b2, impl="xla",
                                                                  mesh=mesh8))):
        try:
            call()
        except ValueError as e:
            errors[name] = str(e)
    out["errors"] = errors
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(int(sys.argv[1]))

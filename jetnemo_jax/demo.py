"""A one-minute tour on a laptop CPU: build the tiny hybrid model, run it on bundled text, fit a few steps.

    python -m jetnemo_jax.demo [--steps 150] [--seq 128] [--preset tiny]

Text: the Python documentation topics shipped with the standard library (pydoc_data), byte-level tokens.
This is a smoke test of the model and its gradients; the training application is train.py (issue 6).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jetnemo_jax import config
from jetnemo_jax.model import JetNemotronForCausalLM


def bundled_bytes() -> np.ndarray:
    from pydoc_data import topics

    text = "\n".join(topics.topics[k] for k in sorted(topics.topics))
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(config.PRESETS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)

    cfg = config.preset(args.preset)
    if cfg.vocab_size < 256:
        parser.error(f"preset {args.preset} has vocab {cfg.vocab_size} < 256 byte tokens")
    data = bundled_bytes()
    print(f"config {args.preset}: layers {''.join(t[0] for t in cfg.layer_types)} "
          f"(a=attn s=swa j=jet), hidden {cfg.hidden_size}; data: {len(data):,} bytes of pydoc_data")
    model = JetNemotronForCausalLM(cfg, rngs=nnx.Rngs(0))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"parameters: {n_params:,}; backend: {jax.default_backend()}")

    optimizer = nnx.Optimizer(model, optax.adamw(args.lr, weight_decay=0.0), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    @jax.jit
    def train_step(state, tokens):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model):
            logits = model(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        starts = rng.integers(0, len(data) - args.seq - 1, args.batch)
        tokens = jnp.asarray(np.stack([data[s:s + args.seq + 1] for s in starts]))
        state, loss = train_step(state, tokens)
        if step == 1 or step % 10 == 0 or step == args.steps:
            loss = float(loss)
            elapsed = time.perf_counter() - t0
            print(f"step {step:4d}  loss {loss:.3f}  ({step * args.batch * args.seq / elapsed:,.0f} tok/s "
                  f"incl. compile)")

    model, _ = nnx.merge(graphdef, state)
    # Greedy sampling over a fixed-length window: one compilation (cached decoding lands with generate.py).
    ids = list(b"def ")
    next_token = jax.jit(lambda m, x, n: jnp.argmax(m(x)[0, n - 1]))
    for _ in range(40):
        window = ids[-args.seq:]
        padded = jnp.asarray([window + [0] * (args.seq - len(window))])
        ids.append(int(next_token(model, padded, len(window))))
    print("greedy sample:", repr(bytes(i % 256 for i in ids).decode("utf-8", "replace")))


if __name__ == "__main__":
    main()

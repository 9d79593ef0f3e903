"""The train step's semantics: packed documents stay apart, frozen weights stay put, NaN handling."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jetnemo_jax import sharding
from jetnemo_jax.train.loop import NonFiniteLoss, initial_params, run
from jetnemo_jax.train.program import build
from jetnemo_jax.train.step import next_token_targets
from tests.train.runs import small_config


def _program(tmp_path, **overrides):
    c = small_config(tmp_path, **overrides)
    program = build(c, sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
    trainable, frozen, teacher = initial_params(c, program)
    return c, program, trainable, frozen, teacher


def _token_losses(program, trainable, frozen, tokens, seg):
    model = program.split.merge(trainable, frozen)
    logits = model(jnp.asarray(tokens), segment_ids=None if seg is None else jnp.asarray(seg))
    targets, valid = next_token_targets(jnp.asarray(tokens), jnp.asarray(seg if seg is not None else
                                                                          np.ones_like(tokens)))
    return np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, targets)), np.asarray(valid)


def test_packed_documents_do_not_leak(tmp_path, rng):
    """Changing the first document of a row leaves the second one's per-token losses unchanged."""
    _, program, trainable, frozen, _ = _program(tmp_path)
    T, split_at = 40, 17  # the second document crosses no chunk or conv boundary specially
    tokens = rng.integers(0, 512, (2, T)).astype(np.int32)
    seg = np.where(np.arange(T) < split_at, 1, 2)[None].repeat(2, 0).astype(np.int32)
    changed = tokens.copy()
    changed[:, :split_at] = rng.integers(0, 512, (2, split_at))
    base, valid = _token_losses(program, trainable, frozen, tokens, seg)
    after, _ = _token_losses(program, trainable, frozen, changed, seg)
    second = slice(split_at, T - 1)
    assert valid[:, split_at - 1].sum() == 0  # the first document's last token predicts nothing
    np.testing.assert_allclose(after[:, second], base[:, second], rtol=0, atol=2e-6)
    # Control: without segment ids the same change does reach the second document.
    base_u, _ = _token_losses(program, trainable, frozen, tokens, None)
    after_u, _ = _token_losses(program, trainable, frozen, changed, None)
    assert np.abs(after_u[:, second] - base_u[:, second]).max() > 1e-3


def test_frozen_parameters_stay_bitwise_unchanged_and_have_no_optimizer_state(tmp_path, rng):
    c, program, trainable, frozen, teacher = _program(tmp_path, **{"train.frozen": "/mlp/|embed_tokens"})
    assert frozen and all("/mlp/" in n or "embed_tokens" in n for n in frozen)
    before = {n: np.asarray(a).copy() for n, a in frozen.items()}
    trainable_before = {n: np.asarray(a).copy() for n, a in trainable.items()}
    state = program.init_state(trainable)
    opt_names = {getattr(k, "key", None) for path, _ in jax.tree_util.tree_leaves_with_path(state["opt_state"])
                 for k in path}
    assert not (opt_names & set(frozen))  # no Adam moments for frozen weights
    for _ in range(2):
        batch = {"tokens": rng.integers(0, 512, (8, 32)).astype(np.int32),
                 "segment_ids": np.ones((8, 32), np.int32)}
        state, metrics = program.step_fn(state, frozen, teacher, batch)
    assert all(np.array_equal(np.asarray(frozen[n]), before[n]) for n in before)
    moved = [n for n in trainable_before if not np.array_equal(np.asarray(state["params"][n]), trainable_before[n])]
    assert len(moved) == len(trainable_before)
    assert np.isfinite(float(metrics["loss"]))


def test_nonfinite_loss_stops_the_run_naming_the_step(tmp_path):
    c = small_config(tmp_path, **{"model.initializer_range": 1e30, "train.steps": 3})
    with pytest.raises(NonFiniteLoss, match=r"at step 1; last good checkpoint: none"):
        run(c)


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_nonfinite_skip_drops_the_update(tmp_path, rng, mode):
    """With nonfinite='skip' a NaN gradient leaves the weights as they were (and 'stop' would apply it)."""
    _, program, trainable, frozen, teacher = _program(tmp_path, **{"model.initializer_range": 1e30,
                                                                   "train.nonfinite": mode,
                                                                   "optim.warmup_steps": 0})
    before = {n: np.asarray(a).copy() for n, a in trainable.items()}
    batch = {"tokens": rng.integers(0, 512, (8, 32)).astype(np.int32), "segment_ids": np.ones((8, 32), np.int32)}
    state, metrics = program.step_fn(program.init_state(trainable), frozen, teacher, batch)
    assert not np.isfinite(float(metrics["grad_norm"]))
    unchanged = all(np.array_equal(np.asarray(state["params"][n]), before[n]) for n in before)
    assert unchanged == (mode == "skip")


def test_frozen_weights_in_the_compute_dtype_train_bit_exactly(tmp_path, rng):
    """train.frozen_dtype='compute' holds frozen matmul/embedding weights in bf16: the same steps bit for bit."""
    runs = {}
    for mode in ("param", "compute"):
        c, program, trainable, frozen, teacher = _program(
            tmp_path / mode, **{"train.frozen": "/mlp/|embed_tokens|norm", "model.dtype": "bfloat16",
                                "train.frozen_dtype": mode})
        dtypes = {n: a.dtype for n, a in frozen.items()}
        state = program.init_state(trainable)
        batches = np.random.default_rng(0).integers(0, 512, (2, 8, 32)).astype(np.int32)
        losses = []
        for tokens in batches:
            state, metrics = program.step_fn(state, frozen, teacher, {"tokens": tokens,
                                                                      "segment_ids": np.ones_like(tokens)})
            losses.append(float(metrics["loss"]))
        runs[mode] = dtypes, losses, {n: np.asarray(a) for n, a in state["params"].items()}
    (p_dt, p_loss, p_params), (c_dt, c_loss, c_params) = runs["param"], runs["compute"]
    assert all(d == jnp.float32 for d in p_dt.values())
    norms = {n for n in c_dt if n.endswith("/weight")}  # read in float32 by RMSNorm: kept as they are
    assert norms and all(c_dt[n] == jnp.float32 for n in norms)
    assert all(c_dt[n] == jnp.bfloat16 for n in set(c_dt) - norms)
    assert c_loss == p_loss
    assert all(np.array_equal(c_params[n], p_params[n]) for n in p_params)

"""The train step: next-token loss (and distillation) over packed rows, gradient accumulation, AdamW.

Losses are sums over valid tokens divided by the batch's valid-token count, so accumulating
`microbatches` gradients equals one big batch exactly (up to summation order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jetnemo_jax import sharding
from jetnemo_jax.train import fused_loss


def next_token_targets(tokens, segment_ids):
    """Targets inside each document; a row's or document's last token predicts nothing (mask False)."""
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    same_doc = jnp.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1],
                                jnp.zeros_like(segment_ids[:, :1], bool)], axis=1)
    return targets, same_doc & (segment_ids > 0)


def kl_per_token(teacher_logits, student_logits, temperature):
    """T^2 KL(softmax(t/T) || softmax(s/T)) per token (Hinton et al.'s scaling keeps gradients O(1))."""
    t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    return temperature ** 2 * jnp.sum(jnp.exp(t) * (t - s), axis=-1)


def make_loss_fn(split, cfg, teacher=None, mesh=None):
    """loss(trainable, frozen, teacher_params, batch, n_valid) -> (loss, per-term sums).

    cfg.train.loss_chunk > 0 computes the LM head and its losses that many tokens
    of every row at a time (train/fused_loss.py: no [B, T, vocab] float32 logits); 0 the plain path."""
    distill = cfg.distill.enabled
    loss_chunk = cfg.train.loss_chunk
    head_name = "lm_head/kernel" if "lm_head/kernel" in split.names else "model/embed_tokens/embedding"
    head_trained = head_name not in split.frozen_names
    if distill and teacher is None:
        raise ValueError("distill.enabled needs a teacher (init.mode='qwen2' builds one)")
    keep = tuple(cfg.distill.hidden_layers) if distill and cfg.distill.mse_weight > 0 else ()

    def loss_fn(trainable, frozen, teacher_params, batch, n_valid):
        if mesh is None:
            return _loss(trainable, frozen, teacher_params, batch, n_valid)
        with sharding.activation_sharding(mesh, cfg.sharding_rules):
            return _loss(trainable, frozen, teacher_params, batch, n_valid)

    def _loss(trainable, frozen, teacher_params, batch, n_valid):
        tokens, seg = batch["tokens"], batch["segment_ids"]
        targets, valid = next_token_targets(tokens, seg)
        validf = valid.astype(jnp.float32)
        model = split.merge(trainable, frozen)
        hidden, kept = model.hidden_states(tokens, segment_ids=seg, remat=cfg.train.remat, keep_layers=keep)
        if distill:
            with jax.named_scope("teacher"):  # scopes label the ops for the step's profile
                t_model = teacher.merge(frozen, teacher_params)
                # With scan_layers, the teacher's runs start where the student's do: both stack the frozen
                # weights they share (MLPs, norms) alike, and XLA computes each stack once.
                split_at = [start for start, _ in model.layer_runs(keep)] if model.config.scan_layers else ()
                t_hidden, t_kept = t_model.hidden_states(tokens, segment_ids=seg, keep_layers=keep, split_at=split_at)
        if loss_chunk:
            with jax.named_scope("lm_head"):
                ce, kl = fused_loss.lm_head_losses(
                    hidden, model.lm_head_weight(), targets, chunk=loss_chunk, dtype=model.config.dtype,
                    w_grad=head_trained, ce_grad=not distill or cfg.distill.ce_weight != 0,
                    t_hidden=t_hidden if distill else None, t_w=t_model.lm_head_weight() if distill else None,
                    temperature=cfg.distill.temperature)
        else:
            logits = model.logits(hidden)
            with jax.named_scope("loss"):
                ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
            if distill:
                with jax.named_scope("teacher"):
                    t_logits = jax.lax.stop_gradient(t_model.logits(t_hidden))
                with jax.named_scope("loss"):
                    kl = kl_per_token(t_logits, logits, cfg.distill.temperature)
        sums = {"ce": jnp.sum(ce * validf)}
        if not distill:
            return sums["ce"] / n_valid, sums
        sums["kl"] = jnp.sum(kl * validf)
        loss = cfg.distill.ce_weight * sums["ce"] + cfg.distill.kl_weight * sums["kl"]
        if keep:
            mse = sum(jnp.mean(jnp.square(kept[i].astype(jnp.float32)
                                          - jax.lax.stop_gradient(t_kept[i]).astype(jnp.float32)), -1)
                      for i in keep)
            sums["mse"] = jnp.sum(mse * validf)
            loss = loss + cfg.distill.mse_weight * sums["mse"]
        return loss / n_valid, sums

    return loss_fn


def make_train_step(split, tx, schedule, cfg, teacher=None, mesh=None):
    """step(state, frozen, teacher_params, batch) -> (state, metrics); state = {step, params, opt_state}."""
    loss_fn = make_loss_fn(split, cfg, teacher, mesh)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    n_micro = cfg.train.microbatches

    def train_step(state, frozen, teacher_params, batch):
        params = state["params"]
        _, valid = next_token_targets(batch["tokens"], batch["segment_ids"])
        n_valid = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
        if n_micro == 1:
            (loss, sums), grads = grad_fn(params, frozen, teacher_params, batch, n_valid)
        else:
            B = batch["tokens"].shape[0]
            if B % n_micro:
                raise ValueError(f"train.microbatches={n_micro} does not divide the batch of {B} rows")
            micro = jax.tree.map(lambda x: x.reshape(n_micro, B // n_micro, *x.shape[1:]), batch)

            def accumulate(carry, mb):
                (loss, sums), grads = grad_fn(params, frozen, teacher_params, mb, n_valid)
                return jax.tree.map(jnp.add, carry, (loss, sums, grads)), None

            zero_sums = jax.eval_shape(lambda: grad_fn(params, frozen, teacher_params,
                                                       jax.tree.map(lambda x: x[0], micro), n_valid)[0][1])
            init = (jnp.zeros((), jnp.float32), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_sums),
                    jax.tree.map(jnp.zeros_like, params))
            (loss, sums, grads), _ = jax.lax.scan(accumulate, init, micro)
        with jax.named_scope("optimizer"):
            updates, opt_state = tx.update(grads, state["opt_state"], params)
            new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                         "opt_state": opt_state}
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]),
                   "tokens": n_valid, **{k: v / n_valid for k, v in sums.items()}}
        return new_state, metrics

    return train_step


def make_eval_step(split, cfg, teacher=None, mesh=None):
    """eval(params, frozen, teacher_params, batch) -> token sums {"tokens", "ce"[, "kl", "mse"]} (no gradient)."""
    loss_fn = make_loss_fn(split, cfg, teacher, mesh)

    def eval_step(params, frozen, teacher_params, batch):
        _, valid = next_token_targets(batch["tokens"], batch["segment_ids"])
        n_valid = jnp.sum(valid).astype(jnp.float32)
        _, sums = loss_fn(params, frozen, teacher_params, batch, jnp.maximum(n_valid, 1))
        return {"tokens": n_valid, **sums}

    return eval_step

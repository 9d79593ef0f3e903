"""The once-for-all super-network of PostNAS step 1, and its feature-distillation training step.

Every layer keeps the original (frozen) attention and gains a trainable linear-attention block; a
placement is a bool mask [L] (True = the layer keeps full attention) passed as data, so one compiled step
serves every sampled placement. `lax.cond` runs only the chosen mixer of each layer. Everything under
`base/` (embeddings, attention, MLPs, norms: the original model) is frozen; the teacher is the same
network with every layer on attention, so it costs no extra weights.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jetnemo_jax.config import ModelConfig
from jetnemo_jax.model import JetNemotronForCausalLM
from jetnemo_jax.nas.blocks import make_block
from jetnemo_jax.ops import doc_ids_from_segments, positions_in_documents
from jetnemo_jax.train import optimizer
from jetnemo_jax.train.partition import ParamSplit
from jetnemo_jax.train.step import kl_per_token, next_token_targets

FROZEN = r"^base/"


class SuperNet(nnx.Module):
    def __init__(self, cfg: ModelConfig, block: str, *, rngs: nnx.Rngs):
        """cfg: the original model's dimensions plus a `jet` section that sizes the linear blocks."""
        self.block = block
        self.base = JetNemotronForCausalLM(cfg.replace(layer_types=("attn",) * cfg.num_hidden_layers), rngs=rngs)
        self.linear = nnx.List([make_block(block, cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])

    @property
    def num_layers(self) -> int:
        return len(self.linear)

    def hidden_states(self, tokens, placement, *, segment_ids=None, keep_layers=()):
        """tokens [B,T]; placement bool [L] -> (final-normed hidden, {i: output of layer i})."""
        doc_ids = None if segment_ids is None else doc_ids_from_segments(segment_ids, tokens.shape)
        positions = (jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape) if doc_ids is None
                     else positions_in_documents(doc_ids))
        x = self.base.model.embed_tokens(tokens)
        kept = {}
        for i, (layer, lin) in enumerate(zip(self.base.model.layers, self.linear)):
            h = layer.input_layernorm(x)
            h = jax.lax.cond(placement[i], lambda h: layer.self_attn(h, positions=positions, doc_ids=doc_ids),
                             lambda h: lin(h, segment_ids=segment_ids).astype(h.dtype), h)
            x = x + h
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            if i in keep_layers:
                kept[i] = x
        return self.base.model.norm(x), kept

    def __call__(self, tokens, placement, *, segment_ids=None):
        return self.base.logits(self.hidden_states(tokens, placement, segment_ids=segment_ids)[0])


def build(cfg: ModelConfig, block: str, teacher_params: nnx.State, seed: int) -> tuple[ParamSplit, dict, dict]:
    """A SuperNet whose `base` holds the teacher's weights -> (split, trainable, frozen)."""
    net = SuperNet(cfg, block, rngs=nnx.Rngs(seed))
    nnx.update(net.base, teacher_params)
    graphdef, state = nnx.split(net, nnx.Param)
    split = ParamSplit(graphdef, state, FROZEN)
    trainable, frozen = split.split(state)
    return split, trainable, frozen


def sample_placement(rng: np.random.Generator, num_layers: int, min_attn: int, max_attn: int) -> np.ndarray:
    """A uniformly random set of full-attention layers, its size uniform in [min_attn, max_attn]."""
    if not 0 <= min_attn <= max_attn <= num_layers:
        raise ValueError(f"need 0 <= min_attn={min_attn} <= max_attn={max_attn} <= num_layers={num_layers}")
    mask = np.zeros(num_layers, bool)
    mask[rng.choice(num_layers, size=rng.integers(min_attn, max_attn + 1), replace=False)] = True
    return mask


def placement_mask(layers, num_layers: int) -> np.ndarray:
    mask = np.zeros(num_layers, bool)
    mask[list(layers)] = True
    return mask


class Distiller:
    """Feature distillation of a SuperNet's linear blocks: one jitted step for every placement.

    Loss per valid token: mse_weight * sum over `mse_layers` of the mean-square difference between the
    layer outputs and the teacher's (feature distillation) + kl_weight * KL(teacher || student) of the
    next-token distributions + ce_weight * cross entropy. The teacher is the frozen base with every layer
    on attention. Build one per network shape and step count; `run` reuses the compiled step.
    """

    def __init__(self, split: ParamSplit, optim_cfg, steps: int, *, mse_layers, mse_weight: float,
                 kl_weight: float = 0.0, ce_weight: float = 0.0):
        self.split, self.steps = split, steps
        trainable, _ = split.abstract()
        self.tx = optimizer.make_optimizer(optim_cfg, steps, list(trainable))
        keep = tuple(mse_layers)
        weights = {"mse": mse_weight, "kl": kl_weight, "ce": ce_weight}
        if keep == () and mse_weight:
            raise ValueError("mse_weight > 0 needs mse_layers")

        def loss_fn(params, frozen, batch, placement):
            tokens, seg = batch["tokens"], batch["segment_ids"]
            targets, valid = next_token_targets(tokens, seg)
            w = valid.astype(jnp.float32)
            net = split.merge(params, frozen)
            hidden, kept = net.hidden_states(tokens, placement, segment_ids=seg, keep_layers=keep)
            t_hidden, t_kept = jax.lax.stop_gradient(
                net.base.hidden_states(tokens, segment_ids=seg, keep_layers=keep))
            logits = net.base.logits(hidden)
            terms = {"ce": optax.softmax_cross_entropy_with_integer_labels(logits, targets)}
            if keep:
                terms["mse"] = sum(jnp.mean(jnp.square(kept[i].astype(jnp.float32)
                                                       - t_kept[i].astype(jnp.float32)), -1) for i in keep)
            if kl_weight:
                terms["kl"] = kl_per_token(net.base.logits(t_hidden), logits, 1.0)
            n = jnp.maximum(w.sum(), 1.0)
            means = {k: jnp.sum(v * w) / n for k, v in terms.items()}
            return sum(weights[k] * v for k, v in means.items()), means

        def step(params, opt_state, frozen, batch, placement):
            (loss, means), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, batch, placement)
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, {"loss": loss, **means}

        self._step = jax.jit(step, donate_argnums=(0, 1))

    def run(self, params: dict, frozen: dict, batch_fn, placement_fn, label: str = "") -> tuple[dict, list[dict]]:
        """`steps` steps on batch_fn(i) with placement_fn(i) (a bool mask) -> (params, per-step metrics).
        Sets `seconds_per_step`, the mean after the first (compiling) step, data included. With a `label`,
        prints progress every fifth of the steps and at least every 30 s."""
        params = jax.tree.map(jnp.array, params)  # a copy: the step donates its inputs
        opt_state = self.tx.init(params)
        history, start, shown = [], None, time.perf_counter()
        for i in range(self.steps):
            params, opt_state, m = self._step(params, opt_state, frozen, batch_fn(i),
                                              jnp.asarray(placement_fn(i)))
            history.append(m)
            if i == 0:  # time the steps after the compiling one
                jax.block_until_ready(m)
                start = time.perf_counter()
            now = time.perf_counter()
            if label and ((i + 1) % max(self.steps // 5, 1) == 0 or now - shown >= 30):
                shown = now
                rate = f", {(now - start) / i:.2f} s/step" if i else ""
                print(f"  [{label}] step {i + 1}/{self.steps}: loss {float(m['loss']):.4f}{rate}", flush=True)
        jax.block_until_ready(params)
        self.seconds_per_step = (time.perf_counter() - start) / max(self.steps - 1, 1)
        return params, [{k: float(v) for k, v in m.items()} for m in jax.device_get(history)]


def hybrid_model(net: SuperNet, placement) -> JetNemotronForCausalLM:
    """The JetNemotronForCausalLM that `net` computes at `placement` (JetBlock supernets only): attention
    where the placement is True, the supernet's JetBlocks elsewhere, the base's weights for the rest."""
    if net.block != "jet":
        raise ValueError(f"only a JetBlock supernet maps onto the Jet-Nemotron model, this one has {net.block!r}")
    cfg = net.base.config.replace(layer_types=tuple("attn" if m else "jet" for m in np.asarray(placement)))
    model = nnx.eval_shape(lambda: JetNemotronForCausalLM(cfg, rngs=nnx.Rngs(0)))
    source = dict(nnx.to_flat_state(nnx.state(net, nnx.Param)))
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[:2] == ("model", "layers") and path[3] == "self_attn" and cfg.layer_types[path[2]] == "jet":
            src = ("linear", path[2], *path[4:])
        else:
            src = ("base", *path)
        flat.append((path, var.replace(source[src][...])))
    nnx.update(model, nnx.from_flat_state(flat))
    return model

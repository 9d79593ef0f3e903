"""The hybrid decoder: per layer full attention ("attn"), sliding window ("swa") or JetBlock ("jet").

`JetNemotronForCausalLM` mirrors the PyTorch module tree (model.embed_tokens, model.layers.{i}.self_attn,
..., lm_head), so parameter paths map one to one onto the official state-dict names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jetnemo_jax.config import ModelConfig
from jetnemo_jax.layers.attention import Attention
from jetnemo_jax.layers.jet_block import JetBlock
from jetnemo_jax.layers.mlp import MLP
from jetnemo_jax.layers.norms import RMSNorm
from jetnemo_jax.layers.params import EMBED, VOCAB, linear, normal
from jetnemo_jax.ops import KERNEL_RESIDUALS, doc_ids_from_segments, positions_in_documents
from jetnemo_jax.sharding import constrain_batch


class DecoderLayer(nnx.Module):
    """h = x + Mixer(RMSNorm(x)); y = h + MLP(RMSNorm(h))."""

    def __init__(self, cfg: ModelConfig, layer_type: str, *, rngs: nnx.Rngs):
        self.layer_type = layer_type
        pdt = jnp.dtype(cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt)
        if layer_type == "jet":
            self.self_attn = JetBlock(cfg, rngs=rngs)
        else:
            window = cfg.sliding_window if layer_type == "swa" else None
            self.self_attn = Attention(cfg, window=window, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, *, positions, doc_ids):
        # Named scopes label the HLO ops for the step's per-component profile (bench/step_profile.py).
        with jax.named_scope("norm"):
            h = self.input_layernorm(x)
        with jax.named_scope(f"mixer_{self.layer_type}"):
            if self.layer_type == "jet":
                h = self.self_attn(h, segment_ids=doc_ids)
            else:
                h = self.self_attn(h, positions=positions, doc_ids=doc_ids)
        x = x + h
        with jax.named_scope("norm"):
            h = self.post_attention_layernorm(x)
        with jax.named_scope("mlp"):
            return x + self.mlp(h)

    def init_cache(self, batch: int, max_len: int, dtype):
        if self.layer_type == "jet":
            return self.self_attn.init_cache(batch, dtype)
        return self.self_attn.init_cache(batch, max_len, dtype)

    def prefill(self, x, *, positions, cache, valid=None):
        h = self.input_layernorm(x)
        if self.layer_type == "jet":
            h, cache = self.self_attn(h, cache=cache, return_cache=True, valid=valid)
        else:
            h, cache = self.self_attn.prefill(h, positions=positions, cache=cache, valid=valid)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache

    def step(self, x, *, position, cache):
        h = self.input_layernorm(x)
        if self.layer_type == "jet":
            h, cache = self.self_attn.step(h, cache)
        else:
            h, cache = self.self_attn.step(h, position=position, cache=cache)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class JetNemotronModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
            embedding_init=nnx.with_partitioning(normal(cfg.initializer_range), (VOCAB, EMBED),
                                                 eager_sharding=False),
            rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, t, rngs=rngs) for t in cfg.layer_types])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=jnp.dtype(cfg.param_dtype))

    def __call__(self, input_ids, *, positions, doc_ids, remat: str = "none", keep_layers=(), scan: bool = False,
                 split_at=()):
        """-> (final-normed hidden [B, T, hidden], {i: output of layer i} for i in keep_layers).
        scan: each run of identical layers (`layer_runs`, also split before each layer of split_at) is one
        lax.scan instead of unrolled layers."""
        by_kind = remat_by_kind(remat)
        runners = {name: _run_layer if name == "none" else nnx.remat(_run_layer, policy=REMAT_POLICIES[name])
                   for name in set(by_kind.values())}
        with jax.named_scope("embed"):
            x = constrain_batch(self.embed_tokens(input_ids))
        kept = {}
        runs = (layer_runs(self.layers, keep_layers, split_at) if scan else
                [(i, i + 1) for i in range(len(self.layers))])
        for start, stop in runs:
            policy = by_kind[self.layers[start].layer_type]
            if stop - start == 1:
                x = constrain_batch(runners[policy](self.layers[start], x, positions, doc_ids))
            else:
                with jax.named_scope(f"scan_layers_{start}_{stop - 1}"):
                    x = _scan_layers([self.layers[i] for i in range(start, stop)], x, positions, doc_ids, policy,
                                     self.embed_tokens.dtype)
            if stop - 1 in keep_layers:
                kept[stop - 1] = x
        with jax.named_scope("norm"):
            return self.norm(x), kept


# Rematerialisation of each decoder layer in the backward pass: what the forward may keep.
REMAT_POLICIES = {
    "none": None,  # no remat: keep every activation
    "full": None,  # keep only layer inputs, recompute the rest
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmul outputs
    "dots_saveable": jax.checkpoint_policies.checkpoint_dots,
    # weight matmul outputs and what kernels name KERNEL_RESIDUALS (the gated delta rule's forward outputs and
    # residuals, the conv forward's stored taps): the recompute runs elementwise work (norms, activations, RoPE)
    # and the attention core, no kernel of the JetBlock (the recompute's copies of those kernels are dead code,
    # removed by XLA: tests/test_remat.py counts the compiled program's kernel loops)
    "kernels": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(KERNEL_RESIDUALS)),
}


LAYER_KINDS = ("jet", "attn", "swa")


def remat_by_kind(spec: str) -> dict[str, str]:
    """A remat spec -> {layer kind: policy name}. The spec is one policy of REMAT_POLICIES for every layer,
    or per kind, comma-separated "kind:policy" (e.g. "jet:none,attn:full,swa:full"); kinds it does not
    name get "full". ValueError naming what is wrong."""
    if spec in REMAT_POLICIES:
        return dict.fromkeys(LAYER_KINDS, spec)
    out = dict.fromkeys(LAYER_KINDS, "full")
    for part in spec.split(","):
        kind, _, name = part.strip().partition(":")
        if kind not in LAYER_KINDS or name not in REMAT_POLICIES:
            raise ValueError(f"remat={spec!r}: expected one of {', '.join(REMAT_POLICIES)}, or comma-separated "
                             f"kind:policy with kind in {', '.join(LAYER_KINDS)}")
        out[kind] = name
    return out


def _run_layer(layer, x, positions, doc_ids):
    return layer(x, positions=positions, doc_ids=doc_ids)


# Scanned layers (ModelConfig.scan_layers). The parameters keep their per-layer layout (model/layers/{i}/...,
# the one checkpoints, PyTorch conversion, sharding rules, freezing regexes, the distillation teacher, PostNAS
# and decoding use): a run's weights are stacked along a new leading axis inside the jitted step and scanned.
# So either form's checkpoint is the other's, instead of MaxText's stacked storage with conversions at every
# boundary (checkpoints, HF names, frozen/teacher sharing by name, decode). The price is one copy of the
# run's weights per step (the stack; for the 2B stage-1 step about 3.5 GB written); Linear kernels and biases
# are stacked in the compute dtype, as each layer would cast them at use (bit-exact: the cast the unrolled
# layers do in their forward and again in their recompute happens once, in the stack). Decoding
# (prefill/decode_step) always runs the layers unrolled.
def _signature(layer):
    """Layers with equal signatures scan together: same module (kind, static attributes) and weights of the
    same tree, shapes and dtypes (frozen and trainable weights may differ in dtype: train.frozen_dtype)."""
    graphdef, state = nnx.split(layer)
    leaves, treedef = jax.tree.flatten(state)
    return graphdef, treedef, tuple((x.shape, jnp.dtype(x.dtype)) for x in leaves)


def layer_runs(layers, keep_layers=(), split_at=()) -> list[tuple[int, int]]:
    """[start, stop) of each maximal run of consecutive layers with one signature; a kept layer ends its run
    (its output is needed), and a run also ends before each layer of `split_at`. A run of one layer is called
    unrolled."""
    runs, prev = [], None
    for i, layer in enumerate(layers):
        sig = _signature(layer)
        if runs and sig == prev and runs[-1][1] - 1 not in keep_layers and i not in split_at:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
        prev = sig
    return runs


def _stacked_weights(layers, compute_dtype) -> list:
    """Each weight of `layers` (one signature) stacked on a new leading axis, in tree-leaf order; Linear
    kernels and biases (which the layers only use cast to the compute dtype) cast to it first."""
    dt = jnp.dtype(compute_dtype)
    out = []
    for leaves in zip(*(jax.tree_util.tree_flatten_with_path(nnx.state(layer))[0] for layer in layers)):
        path, ws = leaves[0][0], [w for _, w in leaves]
        if (any(getattr(k, "key", None) in ("kernel", "bias") for k in path)
                and jnp.dtype(ws[0].dtype).itemsize > dt.itemsize):
            ws = [w.astype(dt) for w in ws]
        out.append(jnp.stack(ws))
    return out


def _scan_layers(layers, x, positions, doc_ids, policy: str, compute_dtype):
    """x through `layers` (one signature) as a lax.scan over their stacked weights; remat `policy` (a
    REMAT_POLICIES name) inside the scanned body, the batch sharding constraint on the carry."""
    graphdef, state = nnx.split(layers[0])
    treedef = jax.tree.structure(state)
    with jax.named_scope("stack_weights"):
        stacked = _stacked_weights(layers, compute_dtype)

    def body(x, weights):
        layer = nnx.merge(graphdef, jax.tree.unflatten(treedef, weights))
        return constrain_batch(layer(x, positions=positions, doc_ids=doc_ids)), None

    if policy != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[policy], prevent_cse=False)
    return jax.lax.scan(body, x, stacked)[0]


class JetNemotronForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.model = JetNemotronModel(cfg, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = linear(cfg.hidden_size, cfg.vocab_size, (EMBED, VOCAB), rngs=rngs, cfg=cfg)

    def hidden_states(self, input_ids, *, positions=None, segment_ids=None, remat="none", keep_layers=(),
                      scan: bool | None = None, split_at=()):
        """Final-normed hidden states [B, T, hidden], and {i: output of layer i} for i in keep_layers.
        scan: layers as scanned runs (None: config.scan_layers); the same parameters either way. split_at:
        layers that start a run (the distillation teacher takes its student's run starts, so that XLA stacks
        the frozen weights both share once)."""
        doc_ids = None if segment_ids is None else doc_ids_from_segments(segment_ids, input_ids.shape)
        if positions is None:
            positions = (jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape) if doc_ids is None
                         else positions_in_documents(doc_ids))
        return self.model(input_ids, positions=positions, doc_ids=doc_ids, remat=remat, keep_layers=keep_layers,
                          scan=self.config.scan_layers if scan is None else scan, split_at=split_at)

    def layer_runs(self, keep_layers=()) -> list[tuple[int, int]]:
        """The runs of layers that `hidden_states` scans when scanning (model.layer_runs)."""
        return layer_runs(self.model.layers, keep_layers)

    def lm_head_weight(self):
        """The LM head as a [vocab, hidden] array: the tied embedding, or lm_head's kernel transposed."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.embedding[...]
        return self.lm_head.kernel[...].T

    @jax.named_scope("lm_head")
    def logits(self, hidden):
        if self.config.tie_word_embeddings:
            out = self.model.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return constrain_batch(out.astype(jnp.float32))

    def __call__(self, input_ids, *, positions=None, segment_ids=None):
        """input_ids [B, T] int -> logits [B, T, vocab] float32. segment_ids [B, T]: packed documents."""
        return self.logits(self.hidden_states(input_ids, positions=positions, segment_ids=segment_ids)[0])

    # Decoding: per-layer caches (JetCache for JetBlocks, KVCache for attention; W slots for sliding window).
    def init_cache(self, batch: int, max_len: int):
        dtype = jnp.dtype(self.config.dtype)
        return [layer.init_cache(batch, max_len, dtype) for layer in self.model.layers]

    def prefill(self, input_ids, caches, *, positions=None, valid=None):
        """A prompt chunk [B, T] -> (logits [B, T, vocab], caches). See `prefill_hidden`."""
        hidden, caches = self.prefill_hidden(input_ids, caches, positions=positions, valid=valid)
        return self.logits(hidden), caches

    def prefill_hidden(self, input_ids, caches, *, positions=None, valid=None):
        """Run a prompt chunk [B, T] through the caches -> (final-normed hidden [B, T, hidden], caches).

        Call repeatedly on consecutive chunks; `positions` [B, T] (default arange(T): the first chunk)
        continue from the previous chunk. valid [B, T] bool (default all True): False marks left padding,
        which attention never attends and JetBlocks skip; its outputs are meaningless.
        """
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        return self._through_caches(input_ids, caches, lambda layer, x, c: layer.prefill(
            x, positions=positions, cache=c, valid=valid), normed_hidden=True)

    def decode_step(self, token, position, caches):
        """token, position [B] -> (logits [B, vocab], caches)."""
        return self._through_caches(token, caches, lambda layer, x, c: layer.step(x, position=position, cache=c))

    def _through_caches(self, tokens, caches, run_layer, normed_hidden=False):
        x = self.model.embed_tokens(tokens)
        new = []
        for layer, cache in zip(self.model.layers, caches):
            x, cache = run_layer(layer, x, cache)
            new.append(cache)
        x = self.model.norm(x)
        return (x if normed_hidden else self.logits(x)), new

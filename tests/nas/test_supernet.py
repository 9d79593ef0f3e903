"""The PostNAS super-network: placement sampling, exactness of its two extremes, what each step trains."""

import re

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jetnemo_jax.config import JetBlockConfig, tiny
from jetnemo_jax.nas import supernet
from tests.oracles import rel_err

L = 3


def _cfg():
    return tiny(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
                vocab_size=64, layer_types=("attn",) * L, jet=JetBlockConfig(num_heads=2, head_dim=8, head_v_dim=8))


@pytest.fixture(scope="module")
def net():
    return supernet.SuperNet(_cfg(), "jet", rngs=nnx.Rngs(1))


def test_sampled_placements_have_the_asked_sizes_and_cover_every_layer(rng):
    masks = np.array([supernet.sample_placement(rng, 6, 1, 3) for _ in range(3000)])
    sizes = masks.sum(1)
    assert sizes.min() == 1 and sizes.max() == 3
    assert np.all(np.abs(np.bincount(sizes)[1:] / 3000 - 1 / 3) < 0.05)  # size uniform over 1..3
    assert np.all(np.abs(masks.mean(0) - masks.mean()) < 0.05)  # no layer favoured
    with pytest.raises(ValueError):
        supernet.sample_placement(rng, 4, 3, 2)


def test_all_attention_is_the_teacher_and_a_placement_is_the_hybrid(net, rng):
    tokens = jnp.asarray(rng.integers(0, 64, (2, 23)))
    seg = np.array([[1] * 10 + [2] * 13, [1] * 23])
    forward = nnx.jit(lambda net, placement: net(tokens, placement, segment_ids=seg))  # one compile for both
    assert rel_err(forward(net, jnp.ones(L, bool)), net.base(tokens, segment_ids=seg)) < 1e-6
    placement = np.array([False, True, False])
    hybrid = supernet.hybrid_model(net, placement)
    assert hybrid.config.layer_types == ("jet", "attn", "jet")
    assert rel_err(forward(net, jnp.asarray(placement)), hybrid(tokens, segment_ids=seg)) < 1e-5


def test_a_step_trains_only_the_linear_blocks_of_non_attention_layers(net, rng, capsys):
    split, params, frozen = supernet.build(_cfg(), "jet", nnx.state(net.base, nnx.Param), seed=3)
    assert all(n.startswith("linear/") for n in params) and all(n.startswith("base/") for n in frozen)
    optim = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=0, min_lr_ratio=1.0, b1=0.9, b2=0.95, eps=1e-8,
                                           weight_decay=0.0, clip_norm=1.0, no_decay=""))
    d = supernet.Distiller(split, optim, 2, mse_layers=range(L), mse_weight=1.0, kl_weight=0.5)
    tokens = rng.integers(0, 64, (2, 16))
    batch = {"tokens": jnp.asarray(tokens, jnp.int32), "segment_ids": jnp.ones((2, 16), jnp.int32)}
    placement = np.array([True, False, True])
    new, hist = d.run(params, frozen, lambda i: batch, lambda i: placement, label="probe")
    assert hist[1]["loss"] < hist[0]["loss"] and hist[0]["mse"] > 0
    shown = capsys.readouterr().out.splitlines()  # progress: each of the 2 steps is a fifth or more
    assert len(shown) == 2 and shown[0] == f"  [probe] step 1/2: loss {hist[0]['loss']:.4f}", shown
    assert re.fullmatch(rf"  \[probe\] step 2/2: loss {hist[1]['loss']:.4f}, [0-9.]+ s/step", shown[1]), shown
    moved = {n for n in params if not np.array_equal(np.asarray(new[n]), np.asarray(params[n]))}
    # The attention layers' linear blocks got no gradient (no weight decay here); the other one trained.
    assert not any(n.startswith(("linear/0/", "linear/2/")) for n in moved)
    assert any(n.startswith("linear/1/") for n in moved)

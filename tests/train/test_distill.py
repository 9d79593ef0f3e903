"""Stage-1 distillation: the teacher is the original all-attention model, sharing the frozen weights."""

import jax
import numpy as np
import pytest
from flax import nnx

from jetnemo_jax import config as model_config
from jetnemo_jax import sharding
from jetnemo_jax.checkpoint.hf_export import save_hf
from jetnemo_jax.model import JetNemotronForCausalLM
from jetnemo_jax.train.config import model_section
from jetnemo_jax.train.loop import initial_params, run
from jetnemo_jax.train.program import build
from jetnemo_jax.train.recipes import STAGE1_FROZEN
from tests.checkpoint.test_convert import random_model
from tests.train.runs import small_config

QWEN = model_config.tiny(layer_types=("attn",) * 4, dtype="float32")
HYBRID_TYPES = ("jet", "attn", "jet", "swa")


@pytest.fixture
def qwen_dir(tmp_path, rng):
    path = tmp_path / "qwen"
    save_hf(random_model(QWEN, rng), path, dtype="float32")
    return path


def _stage1(tmp_path, qwen_dir, layer_types, **overrides):
    c = small_config(tmp_path / "run", **{"train.frozen": STAGE1_FROZEN, "init.mode": "qwen2",
                                          "init.path": str(qwen_dir), "distill.enabled": True,
                                          "distill.mse_weight": 1.0, "distill.hidden_layers": (1, 3), **overrides})
    c.model = model_section("tiny", layer_types=layer_types, dtype="float32")
    return c


def _first_step(c, rng):
    program = build(c, sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
    trainable, frozen, teacher = initial_params(c, program)
    batch = {"tokens": rng.integers(0, 512, (8, 32)).astype(np.int32),
             "segment_ids": np.repeat(np.where(np.arange(32) < 13, 1, 2)[None], 8, 0).astype(np.int32)}
    _, metrics = program.step_fn(program.init_state(trainable), frozen, teacher, batch)
    return program, teacher, {k: float(v) for k, v in metrics.items()}


def test_teacher_holds_only_what_it_does_not_share(tmp_path, qwen_dir, rng):
    program, teacher_own, metrics = _first_step(_stage1(tmp_path, qwen_dir, HYBRID_TYPES), rng)
    own = set(program.teacher.own_names)
    assert own and all("/self_attn/" in n for n in own)  # no MLP, embedding or norm copies
    assert set(teacher_own) == own
    # The teacher's attention in the student's JetBlock layers comes from the Qwen checkpoint.
    assert "model/layers/0/self_attn/q_proj/kernel" in own
    assert metrics["kl"] > 1e-3 and metrics["mse"] > 1e-4 and np.isfinite(metrics["loss"])


def test_student_identical_to_teacher_has_zero_distillation_loss(tmp_path, qwen_dir, rng):
    _, _, metrics = _first_step(_stage1(tmp_path, qwen_dir, ("attn",) * 4), rng)
    assert abs(metrics["kl"]) < 1e-6 and metrics["mse"] < 1e-10


def test_stage1_run_saves_frozen_and_teacher_once(tmp_path, qwen_dir):
    c = _stage1(tmp_path, qwen_dir, HYBRID_TYPES, **{"train.steps": 3, "checkpoint.every": 3})
    result = run(c)
    assert result["steps"] == 3 and np.isfinite(result["final_loss"])
    assert (tmp_path / "run" / "frozen").is_dir()


def test_flops_count_the_teachers_forward_apart(tmp_path, qwen_dir):
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    c = _stage1(tmp_path, qwen_dir, HYBRID_TYPES)
    program = build(c, mesh)
    tcfg = program.teacher.config
    assert set(tcfg.layer_types) == {"attn"}
    # The whole all-attention teacher, counted from its own module: every Linear kernel, the tied lm_head, and the
    # causal attention core (a query sees (T+1)/2 keys on average: scores and values, 2 FLOPs per multiply-add).
    whole = nnx.eval_shape(lambda: JetNemotronForCausalLM(tcfg, rngs=nnx.Rngs(0)))
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(whole))[0]
    n = sum(x.size for path, x in leaves if "'kernel'" in jax.tree_util.keystr(path))
    n += tcfg.vocab_size * tcfg.hidden_size if tcfg.tie_word_embeddings else 0
    T = c.data.seq_len
    attention = len(tcfg.layer_types) * 4 * (T + 1) / 2 * tcfg.num_attention_heads * tcfg.head_dim
    assert program.flops_per_token["teacher_forward"] == pytest.approx(2 * n + attention, rel=1e-12)
    c.distill.enabled = False
    assert build(c, mesh).flops_per_token["teacher_forward"] == 0.0

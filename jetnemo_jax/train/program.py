"""Everything a run compiles, independent of where its inputs come from: the model's abstract parameters
split into trainable and frozen, the optional teacher, the optimiser, the shardings and the jitted step.

The training loop feeds it real arrays; `compile_only` lowers it for a TPU topology from ShapeDtypeStructs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jetnemo_jax import sharding
from jetnemo_jax.config import ModelConfig
from jetnemo_jax.model import JetNemotronForCausalLM
from jetnemo_jax.train import flops, optimizer, step
from jetnemo_jax.train.config import resolve_model_config
from jetnemo_jax.train.distill import Teacher
from jetnemo_jax.train.partition import ParamSplit, in_compute_dtype, path_name


def _by_name(abstract_state, mesh, rules) -> dict[str, NamedSharding]:
    return {path_name(p): s for p, s in sharding.param_shardings(abstract_state, mesh, rules).items()}


def _opt_state_shardings(abstract_opt_state, param_sh: dict, mesh: Mesh):
    """Optimizer moments follow their parameter's sharding; counters and scalars are replicated."""
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        for key in path:
            name = getattr(key, "key", None)
            if name in param_sh:
                return param_sh[name]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


@dataclasses.dataclass
class Program:
    config: object  # the ml_collections run config
    model_config: ModelConfig
    mesh: Mesh
    split: ParamSplit
    teacher: Teacher | None
    tx: object
    schedule: object
    state_shardings: dict
    frozen_shardings: dict
    teacher_shardings: dict
    batch_sharding: NamedSharding
    abstract_state: dict  # {step, params, opt_state} as ShapeDtypeStructs with shardings
    abstract_frozen: dict
    abstract_teacher: dict
    flops_per_token: dict
    step_fn: object  # jitted (state, frozen, teacher, batch) -> (state, metrics); state donated
    eval_fn: object  # jitted (params, frozen, teacher, batch) -> {"tokens", "ce"[, "kl", "mse"]}: token sums

    def abstract_batch(self, global_batch: int, seq_len: int) -> dict:
        s = jax.ShapeDtypeStruct((global_batch, seq_len), jnp.int32, sharding=self.batch_sharding)
        return {"tokens": s, "segment_ids": s}

    def init_state(self, trainable: dict) -> dict:
        """Fresh optimizer state for (already sharded) trainable parameters."""
        init = jax.jit(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": self.tx.init(p)},
                       in_shardings=(self.state_shardings["params"],), out_shardings=self.state_shardings)
        return init(trainable)


def _with_sharding(abstract: dict, shardings: dict) -> dict:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def build(config, mesh: Mesh) -> Program:
    cfg = resolve_model_config(config)  # reads init.path's config.json where config.model leaves fields unset
    rules = tuple(tuple(r) for r in config.sharding_rules)
    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: JetNemotronForCausalLM(cfg, rngs=nnx.Rngs(0))))
    split = ParamSplit(graphdef, abstract_params, config.train.frozen)
    param_sh = _by_name(abstract_params, mesh, rules)
    trainable_abs, frozen_abs = split.abstract()
    trainable_abs = {n: jax.ShapeDtypeStruct(v.shape, v.dtype) for n, v in trainable_abs.items()}
    frozen_abs = {n: jax.ShapeDtypeStruct(v.shape, v.dtype) for n, v in frozen_abs.items()}
    if config.train.frozen_dtype == "compute":
        frozen_abs = in_compute_dtype(frozen_abs, cfg.dtype)

    teacher, teacher_abs, teacher_sh = None, {}, {}
    if config.distill.enabled:
        teacher = Teacher(cfg, frozen_abs)
        _, t_state = nnx.split(nnx.eval_shape(lambda: JetNemotronForCausalLM(teacher.config,
                                                                                   rngs=nnx.Rngs(0))))
        t_sh = _by_name(t_state, mesh, rules)
        teacher_abs = {n: jax.ShapeDtypeStruct(v.shape, v.dtype) for n, v in teacher.abstract_own().items()}
        if config.train.frozen_dtype == "compute":
            teacher_abs = in_compute_dtype(teacher_abs, cfg.dtype)
        teacher_sh = {n: t_sh[n] for n in teacher_abs}

    total = config.train.steps
    sched = optimizer.schedule(config.optim, total)
    tx = optimizer.make_optimizer(config.optim, total, list(trainable_abs), config.train.nonfinite)
    trainable_sh = {n: param_sh[n] for n in trainable_abs}
    opt_abs = jax.eval_shape(tx.init, trainable_abs)
    state_sh = {"step": NamedSharding(mesh, P()), "params": trainable_sh,
                "opt_state": _opt_state_shardings(opt_abs, trainable_sh, mesh)}
    frozen_sh = {n: param_sh[n] for n in frozen_abs}
    abstract_state = _with_sharding({"step": jax.ShapeDtypeStruct((), jnp.int32), "params": trainable_abs,
                                     "opt_state": opt_abs}, state_sh)
    batch_sh = sharding.batch_sharding(mesh, rules)

    train_step = step.make_train_step(split, tx, sched, config, teacher, mesh)
    step_fn = jax.jit(train_step, in_shardings=(state_sh, frozen_sh, teacher_sh, {"tokens": batch_sh,
                                                                                    "segment_ids": batch_sh}),
                      out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=(0,))
    batch_shardings = {"tokens": batch_sh, "segment_ids": batch_sh}
    eval_fn = jax.jit(step.make_eval_step(split, config, teacher, mesh),
                      in_shardings=(trainable_sh, frozen_sh, teacher_sh, batch_shardings),
                      out_shardings=NamedSharding(mesh, P()))
    return Program(
        config=config, model_config=cfg, mesh=mesh, split=split, teacher=teacher, tx=tx, schedule=sched,
        state_shardings=state_sh, frozen_shardings=frozen_sh, teacher_shardings=teacher_sh,
        batch_sharding=batch_sh, abstract_state=abstract_state,
        abstract_frozen=_with_sharding(frozen_abs, frozen_sh),
        abstract_teacher=_with_sharding(teacher_abs, teacher_sh),
        flops_per_token=flops.flops_per_token(trainable_abs, frozen_abs, cfg, config.data.seq_len,
                                              (teacher_abs, teacher.config) if teacher else None),
        step_fn=step_fn, eval_fn=eval_fn)

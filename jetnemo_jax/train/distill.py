"""The stage-1 distillation teacher: the original all-attention model (Qwen2.5 layout).

It shares every parameter the student keeps frozen and unchanged (embeddings, MLPs, norms), so those live
in memory once; only what differs (attention where the student has JetBlocks, and any attention the
student trains) is held as the teacher's own frozen copy.
"""

from __future__ import annotations

import re

from flax import nnx

from jetnemo_jax.config import ModelConfig
from jetnemo_jax.model import JetNemotronForCausalLM
from jetnemo_jax.train.partition import path_name

_MIXER = re.compile(r"^model/layers/(\d+)/self_attn/")


def teacher_config(student: ModelConfig) -> ModelConfig:
    return student.replace(layer_types=("attn",) * student.num_hidden_layers)


class Teacher:
    def __init__(self, student_cfg: ModelConfig, student_frozen_abstract: dict):
        self.config = teacher_config(student_cfg)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: JetNemotronForCausalLM(self.config, rngs=nnx.Rngs(0))))
        self.graphdef = graphdef
        self._flat = [(path_name(p), p, v) for p, v in nnx.to_flat_state(state)]

        def shareable(name, var):
            m = _MIXER.match(name)
            if m and student_cfg.layer_types[int(m.group(1))] == "jet":
                return False  # a JetBlock's projections are not the attention's, whatever their shapes
            s = student_frozen_abstract.get(name)
            return s is not None and s.shape == var.shape

        self.shared = frozenset(n for n, _, v in self._flat if shareable(n, v))
        self.own_names = [n for n, _, _ in self._flat if n not in self.shared]

    def abstract_own(self) -> dict:
        return {n: v for n, _, v in self._flat if n not in self.shared}

    def own_params(self, teacher_model) -> dict:
        """The teacher's own parameters, taken from a full all-attention model (e.g. the loaded Qwen2.5)."""
        flat = {path_name(p): v[...] for p, v in nnx.to_flat_state(nnx.state(teacher_model, nnx.Param))}
        return {n: flat[n] for n in self.own_names}

    def merge(self, student_frozen: dict, own: dict):
        state = nnx.from_flat_state([(p, v.replace(student_frozen[n] if n in self.shared else own[n]))
                                     for n, p, v in self._flat])
        return nnx.merge(self.graphdef, state)

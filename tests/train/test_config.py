"""Run configs: every shipped config builds, misspelt keys fail with the valid ones listed."""

import importlib.util

import pytest

from jetnemo_jax.train.config import check_keys, default_config, to_model_config
from tests.train.runs import ROOT, run_train, small_flags

CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_are_valid(name):
    """Train configs against train's defaults, PostNAS configs (configs/postnas_*) against PostNAS's."""
    from jetnemo_jax.nas.config import default_config as nas_defaults

    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    check_keys(c, nas_defaults() if name.startswith("postnas_") else None)
    cfg = to_model_config(c.model)
    assert cfg.num_hidden_layers == len(cfg.layer_types)


def test_stage1_freezes_mlps_embeddings_and_norms_only():
    import re

    from jetnemo_jax.train.recipes import STAGE1_FROZEN

    frozen = re.compile(STAGE1_FROZEN)
    assert frozen.search("model/layers/3/mlp/up_proj/kernel")
    assert frozen.search("model/embed_tokens/embedding")
    assert frozen.search("model/layers/3/post_attention_layernorm/weight") and frozen.search("model/norm/weight")
    assert not frozen.search("model/layers/3/self_attn/o_norm/weight")  # JetBlock's own norm trains
    assert not frozen.search("model/layers/3/self_attn/q_proj/kernel")


def test_unknown_key_in_a_config_lists_the_valid_keys():
    c = default_config()
    c.optim.unlock()
    c.optim.lrr = 1.0
    with pytest.raises(KeyError, match=r"'optim.lrr' \(did you mean 'optim.lr'\?\).*valid keys under optim: b1"):
        check_keys(c)


def test_unknown_key_on_the_command_line_fails(tmp_path):
    out = run_train(small_flags(tmp_path, **{"train.stepz": 3}))
    assert out.returncode != 0
    assert "stepz" in out.stderr and "steps" in out.stderr, out.stderr[-2000:]


def test_init_path_is_checked_early_and_a_workdir_means_its_final(tmp_path):
    from jetnemo_jax.train.config import resolve_init_path

    config = default_config()
    config.init.mode, config.init.path = "params", ""
    with pytest.raises(ValueError, match="init.mode='params' needs init.path"):
        resolve_init_path(config)
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "config.json").write_text("{}")
    config.init.path = str(tmp_path / "run")
    assert "workdir" in resolve_init_path(config) and config.init.path == str(tmp_path / "run" / "final")
    assert resolve_init_path(config) is None  # a checkpoint directory stays as it is
    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
    config.init.path = str(tmp_path / "unfinished")
    with pytest.raises(ValueError, match="without final/"):
        resolve_init_path(config)

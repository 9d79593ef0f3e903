"""train.py --export: a run's checkpoint at any saved step written as final/ is (config.json, params/, tokenizer)."""

import numpy as np
import pytest

from jetnemo_jax.checkpoint.orbax_params import load_params
from jetnemo_jax.checkpoint.state_dict import to_state_dict
from jetnemo_jax.data.tokenizer import find_tokenizer_dir
from tests.train.runs import run_train, small_config, small_flags


def test_export_of_a_saved_step(tmp_path):
    from jetnemo_jax.train.loop import export_checkpoint

    run = tmp_path / "run"
    out = run_train(small_flags(run), JAX_PLATFORMS="cpu")  # 6 steps, checkpoints at 3 and 6, then final/
    assert out.returncode == 0, out.stderr[-3000:]
    # The newest checkpoint, from the command line: the same weights as final/, bit for bit.
    cli = run_train(small_flags(run) + [f"--export={tmp_path / 'newest'}"], JAX_PLATFORMS="cpu")
    assert cli.returncode == 0 and f"exported to {tmp_path / 'newest'}" in cli.stdout, cli.stderr[-3000:]
    final, newest = (to_state_dict(load_params(p)) for p in (run / "final", tmp_path / "newest"))
    assert final.keys() == newest.keys() and all(np.array_equal(final[k], newest[k]) for k in final)
    assert find_tokenizer_dir(tmp_path / "newest") is not None
    # An earlier step, in-process with the same config: other weights.
    config = small_config(run, **{"model.layer_types": ("jet", "attn")})
    export_checkpoint(config, 3, str(tmp_path / "step3"))
    step3 = to_state_dict(load_params(tmp_path / "step3"))
    assert step3.keys() == final.keys() and any(not np.array_equal(final[k], step3[k]) for k in final)
    with pytest.raises(ValueError, match=r"holds steps \[3, 6\]"):
        export_checkpoint(config, 4, str(tmp_path / "step4"))
    with pytest.raises(ValueError, match="exists"):
        export_checkpoint(config, 3, str(tmp_path / "step3"))
    with pytest.raises(ValueError, match="no checkpoints/"):
        export_checkpoint(small_config(tmp_path / "nowhere"), None, str(tmp_path / "x"))

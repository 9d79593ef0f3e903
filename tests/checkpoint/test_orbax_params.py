"""checkpoint/orbax_params.py: a checkpoint saved from sharded parameters on a mesh of several devices opens
in a one-device process (eval, generate and conversion run on one device after training on a pod)."""

import os
import subprocess
import sys

import numpy as np
from flax import nnx

from jetnemo_jax.checkpoint.orbax_params import load_params

_SAVE = """
import os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
import jax, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from jetnemo_jax.checkpoint.orbax_params import save_params
from jetnemo_jax.model import JetNemotronForCausalLM
from tests.test_generate import CFG
model = JetNemotronForCausalLM(CFG, rngs=nnx.Rngs(3))
mesh = jax.make_mesh((4,), ("fsdp",))
state = nnx.state(model, nnx.Param)
shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("fsdp") if x.shape and x.shape[0] % 4 == 0 else P()))
nnx.update(model, jax.tree.map(shard, state))
assert len(model.model.embed_tokens.embedding[...].sharding.device_set) == 4
save_params(model, sys.argv[1])
"""


def test_a_checkpoint_saved_on_four_devices_opens_on_one(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", _SAVE, str(tmp_path / "ckpt")], cwd=root, capture_output=True,
                         text=True, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    from jetnemo_jax.model import JetNemotronForCausalLM
    from tests.test_generate import CFG

    model = load_params(tmp_path / "ckpt")
    expect = nnx.to_pure_dict(nnx.state(JetNemotronForCausalLM(CFG, rngs=nnx.Rngs(3)), nnx.Param))
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for (path, a), (_, b) in zip(sorted(nnx.traversals.flatten_mapping(got).items()),
                                 sorted(nnx.traversals.flatten_mapping(expect).items())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))

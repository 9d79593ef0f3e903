"""Train steps on a 2x2x2 (data, fsdp, tensor) mesh of 8 simulated devices equal the one-device steps."""

import json
import subprocess
import sys

from tests.train.runs import ROOT, env


def test_mesh_2x2x2_and_accumulation_match_one_device(rng):
    seed = int(rng.integers(1 << 31))
    proc = subprocess.run([sys.executable, "-m", "tests.train._sharded_step", str(seed)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    print(out)
    assert out["sharded_params"] > out["n_params"] // 2, out  # the mesh really shards the weights
    assert out["embedding_spec"] == ["tensor", "fsdp"]
    assert out["min_param_change"][0] > 1e-6  # every parameter moved: the comparison below means something
    assert out["loss_rel_8"] <= 1e-5  # loss and grad norm of each of 3 steps
    assert out["loss_rel_accum"] <= 1e-5
    assert out["param_rel_8"] <= 1e-5
    assert out["param_rel_accum"] <= 1e-5

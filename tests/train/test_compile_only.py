"""Ahead-of-time compilation of the train step for TPU pods on this CPU machine (needs libtpu)."""

import importlib.util
import os
import re

import pytest

from tests.train.runs import ROOT, env

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (pip install -e '.[tpu]')")

TPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-4", "TPU_WORKER_HOSTNAMES": "localhost",
           "TPU_WORKER_ID": "0", "JAX_PLATFORMS": "cpu",
           # libtpu takes /tmp/libtpu_lockfile; other processes of the suite may hold it (no TPU is used here)
           "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def run_compile_only(config, topology, *flags, slices=1):
    import subprocess
    import sys

    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / config),
           f"--compile_only={topology}", f"--compile_only_slices={slices}", *flags]
    # XLA_FLAGS empty: the TPU compile as users run it (the suite's CPU -O0 would barely shorten it)
    return subprocess.run(cmd, env=env(**TPU_ENV, XLA_FLAGS=""), cwd=ROOT, capture_output=True, text=True, timeout=900)


def compile_only(config, topology, *flags, slices=1):
    out = run_compile_only(config, topology, *flags, slices=slices)
    assert out.returncode == 0, out.stderr[-4000:]
    print(out.stdout)
    head = re.search(r"(\d+) chips \((.+?)\) on (\d+) hosts", out.stdout)
    total = float(re.search(r"total ([\d.]+) GiB", out.stdout).group(1))
    return int(head.group(1)), head.group(2), int(head.group(3)), total, out.stdout


def test_tiny_model_on_v5e_4x4_four_hosts():
    chips, kind, hosts, total, out = compile_only("tiny.py", "v5e:4x4", "--config.mesh.data=4",
                                                  "--config.mesh.fsdp=4", "--config.data.global_batch=16",
                                                  "--config.model.layer_types=jet,attn,swa")
    assert (chips, hosts) == (16, 4) and "v5" in kind and 0 < total < 1
    # "auto" puts both kernel families in the sharded step: gated delta rule and generated conv, fwd and bwd
    assert int(re.search(r"kernel calls in the step: (\d+)", out).group(1)) > 0


def test_a_step_that_does_not_fit_is_one_line():
    # one sequence of 64K tokens per chip through the masked XLA attention: [T, T] scores per head, far beyond
    # a v5e chip's 16 GiB
    out = run_compile_only("tiny.py", "v5e:2x2", "--config.mesh.fsdp=4", "--config.data.global_batch=4",
                           "--config.data.seq_len=65536", "--config.model.attn_impl=xla",
                           "--config.model.layer_types=attn")
    assert out.returncode == 2, out.stderr[-4000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "does not fit v5e:2x2" in last and "exceeds available HBM" in last and "Traceback" not in out.stderr


def test_tiny_model_multislice():
    chips, _, hosts, _, out = compile_only("tiny.py", "v5e:2x2", "--config.mesh.data=2", "--config.mesh.fsdp=4",
                                           "--config.data.global_batch=16", "--config.model.layer_types=jet,attn",
                                           slices=2)
    assert chips == 8 and "2 slice(s)" in out
    assert re.search(r"compile cold [\d.]+ s \(persistent cache off\)", out), out  # off: nothing would read it


@pytest.mark.skipif(os.environ.get("JETNEMO_AOT_2B") != "1", reason=(
    "the 2B stage-1 step's v5p:4x4x4 compile takes 3-7 minutes of CI's 30 (JETNEMO_AOT_2B=1 runs it; "
    "the tiny tests above cover the same path)"))
def test_2b_stage1_on_v5p_4x4x4():
    # Scanned layers: the same step in 6 GB of host memory instead of 14.7 GB (BENCHMARKS.md), so that it fits
    # beside the suite's other worker on a 2-core CI machine; the unrolled form is compiled by the tiny tests.
    # The TPU forms of the fast GPU step: splash attention (cuDNN's counterpart) and the chunked LM head + loss.
    chips, _, hosts, total, out = compile_only("jet_nemotron_2b_stage1.py", "v5p:4x4x4",
                                               "--config.model.scan_layers=True", "--config.model.attn_impl=splash",
                                               "--config.train.loss_chunk=1024")
    assert chips == 64 and hosts == 16
    assert total < 95  # fits a v5p chip's HBM (the compiler would have refused otherwise)
    assert int(re.search(r"kernel calls in the step: (\d+)", out).group(1)) > 0


@pytest.mark.parametrize("topology,match", [("v5p", "expected a TPU topology as chip:dims"),
                                            ("v9x:2x2", "cannot describe this TPU topology")])
def test_bad_topology_is_one_user_error(topology, match, monkeypatch):
    from jetnemo_jax.cli import UserError
    from jetnemo_jax.train.compile_only import topology_devices

    for key, value in TPU_ENV.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match=match):
        topology_devices(topology)

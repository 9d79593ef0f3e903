"""Peak host memory and time of convert_torch_ckpt.py at full size, with random weights.

    python bench/convert_memory.py --preset jet_nemotron_2b [--workdir /tmp/convbench] [--json out.json]

Writes a random bf16 HF checkpoint of the preset, then runs `hf-to-jax` and `jax-to-hf` (and
`qwen2-to-jet` from the matching Qwen2.5 shape) each in a fresh process, reporting wall time and peak RSS
(ru_maxrss of the child; it counts the safetensors pages the child mapped, which the OS can drop).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN_OF = {"jet_nemotron_2b": "qwen2_5_1_5b", "jet_nemotron_4b": "qwen2_5_3b"}


def write_random_hf(preset: str, dst: str) -> None:
    code = (
        "import sys; from flax import nnx; from jetnemo_jax import config;"
        "from jetnemo_jax.model import JetNemotronForCausalLM;"
        "from jetnemo_jax.checkpoint.hf_export import save_hf;"
        f"m = JetNemotronForCausalLM(config.preset({preset!r}, param_dtype='bfloat16'), rngs=nnx.Rngs(0));"
        f"save_hf(m, {dst!r}, dtype='bfloat16', overwrite=True)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def measured(args: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "convert_torch_ckpt.py"), *args], cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"convert_torch_ckpt.py {' '.join(args)} failed")
    return {"command": " ".join(args[:1]), "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_gib": round(usage.ru_maxrss / 1024 ** 2, 2)}


def same_tensors(a: str, b: str) -> bool:
    """Bit-exact comparison of two HF directories, one tensor in memory at a time."""
    from jetnemo_jax.checkpoint.safetensors_dir import SafetensorsDir

    da, db = SafetensorsDir(a), SafetensorsDir(b)
    if da.shapes != db.shapes:
        return False
    return all(da.get(n).tobytes() == db.get(n).tobytes() for n in da.shapes)


def same_params(a: str, b: str) -> bool:
    """Bit-exact comparison of two JAX (Orbax) checkpoints."""
    import jax
    import numpy as np
    from flax import nnx

    from jetnemo_jax.checkpoint.orbax_params import load_params

    leaves = [jax.tree.leaves(nnx.state(load_params(d), nnx.Param)) for d in (a, b)]
    return len(leaves[0]) == len(leaves[1]) and all(
        x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(*leaves))


def dir_gib(path: str) -> float:
    return round(sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 1024 ** 3, 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="jet_nemotron_2b", choices=sorted(QWEN_OF))
    parser.add_argument("--workdir", default="/tmp/convbench")
    parser.add_argument("--json")
    args = parser.parse_args()
    work = os.path.join(args.workdir, args.preset)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    hf, jax_dir, back, jax_back = (os.path.join(work, n) for n in ("hf", "jax", "hf_back", "jax_back"))
    qwen, jet = os.path.join(work, "qwen"), os.path.join(work, "jet_init")
    write_random_hf(args.preset, hf)
    write_random_hf(QWEN_OF[args.preset], qwen)
    rows = [measured(["hf-to-jax", hf, jax_dir]), measured(["jax-to-hf", jax_dir, back]),
            measured(["qwen2-to-jet", qwen, jet, "--preset", args.preset])]
    measured(["hf-to-jax", back, jax_back])
    exact_hf, exact_jax = same_tensors(hf, back), same_params(jax_dir, jax_back)
    exact = exact_hf and exact_jax
    print(f"HF -> JAX -> HF bit-exact: {exact_hf}; JAX -> HF -> JAX bit-exact: {exact_jax}")
    print(f"{args.preset}: HF checkpoint {dir_gib(hf)} GiB (bf16), machine RAM "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1024 ** 3:.0f} GiB, {os.cpu_count()} cores")
    print(f"{'command':<14}{'seconds':>9}{'peak RSS GiB':>14}")
    for r in rows:
        print(f"{r['command']:<14}{r['seconds']:>9}{r['peak_rss_gib']:>14}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "hf_gib": dir_gib(hf), "hf_jax_hf_exact": exact_hf,
                       "jax_hf_jax_exact": exact_jax, "rows": rows}, f, indent=2)
    shutil.rmtree(work, ignore_errors=True)
    if not exact:
        raise SystemExit("round trip is not bit-exact")


if __name__ == "__main__":
    main()

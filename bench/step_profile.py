"""Per-component device-time breakdown of a compiled train step, from a jax.profiler trace.

Each GPU kernel in the trace names its HLO instruction (the `hlo_op` stat); the compiled module's text
gives that instruction's `op_name`, which carries the model's `jax.named_scope`s (model.py, layers/,
train/step.py). A kernel is charged to the innermost component its op_name names, and to a phase:
forward, rematerialised recompute (`rematted_computation`, jax.checkpoint) or backward (`transpose(`).

    python bench/train_scaling.py --profile DIR ...          # trace the real step and print the table
    python bench/step_profile.py --xplane X.xplane.pb[.gz] --hlo step.hlo.txt[.gz] [--steps N]  # re-parse
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re

# (component, scope tokens that mark it): the first match wins, so inner scopes come before outer ones.
COMPONENTS = (
    ("optimizer update", ("optimizer",)),
    ("LM head + loss", ("lm_head", "loss")),
    ("teacher forward", ("teacher",)),
    ("JetBlock gated delta rule", ("jet_gdr",)),
    ("JetBlock generated conv", ("jet_conv",)),
    ("JetBlock projections, gates, out norm", ("jet_proj",)),
    ("full attention core", ("mixer_attn/attn_core", "mixer_attn)/attn_core")),
    ("sliding-window attention core", ("mixer_swa/attn_core", "mixer_swa)/attn_core")),
    ("attention projections + RoPE", ("attn_proj",)),
    ("MLP (frozen)", ("mlp",)),
    ("RMSNorms", ("norm",)),
    ("embedding", ("embed",)),
)
COLLECTIVE_OPCODES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all",
                      "all-gather-start", "all-reduce-start", "collective-permute-start")
PHASES = ("forward", "recompute", "backward")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
    """instruction name -> (opcode, op_name) for every instruction of the compiled module's text."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            op = _OP_NAME.search(line)
            out[m.group(1)] = (m.group(2), op.group(1) if op else "")
    return out


def _has_scope(op_name: str, token: str) -> bool:
    return re.search(r"(?:^|[/(])" + re.escape(token) + r"(?:$|[/)])", op_name) is not None


def classify(opcode: str, op_name: str) -> tuple[str, str]:
    """-> (component, phase) of one HLO instruction."""
    if opcode in COLLECTIVE_OPCODES or opcode.startswith(("all-", "reduce-scatter", "collective-")):
        component = "collectives"
    else:
        component = next((c for c, tokens in COMPONENTS if any(_has_scope(op_name, t) for t in tokens)), "other")
    phase = ("recompute" if "rematted_computation" in op_name else
             "backward" if "transpose(" in op_name else "forward")
    return component, phase


def _stats(event) -> dict:
    return {k: v for k, v in event.stats}


def device_events(xspace):
    """(plane, line, event) for the kernels and copies of every GPU plane (the CUPTI stream lines); with
    no GPU plane, the host's XLA thunk events (CPU runs: tests)."""
    gpus = [pl for pl in xspace.planes if pl.name.startswith("/device:GPU")]
    for plane in gpus:
        lines = list(plane.lines)
        streams = [ln for ln in lines if ln.name.startswith("Stream")] or lines
        for line in streams:
            for ev in line.events:
                yield plane, line, ev
    if not gpus:
        for plane in xspace.planes:
            if plane.name == "/host:CPU":
                for line in plane.lines:
                    for ev in line.events:
                        if any(k == "hlo_op" for k, _ in ev.stats):
                            yield plane, line, ev


def breakdown(xspace, hlo_text: str, steps: int, module_hint: str = "train_step") -> dict:
    """Per-component, per-phase device time (ms per step) of the module whose name contains module_hint."""
    ops = hlo_ops(hlo_text)
    table = collections.defaultdict(float)
    kernels = collections.defaultdict(lambda: [0.0, 0, "", ""])
    intervals, other_modules, unmatched = [], 0.0, 0.0
    for _, _, ev in device_events(xspace):
        st = _stats(ev)
        dur = ev.duration_ns / 1e6
        module = str(st.get("hlo_module", ""))
        if module_hint not in module:
            other_modules += dur
            continue
        hlo_op = str(st.get("hlo_op", ""))
        opcode, op_name = ops.get(hlo_op, ("", ""))
        if not op_name and hlo_op not in ops:
            unmatched += dur
        component, phase = classify(opcode, op_name)
        table[component, phase] += dur
        k = kernels[ev.name]
        k[0] += dur
        k[1] += 1
        k[2], k[3] = k[2] or hlo_op, k[3] or op_name
        intervals.append((ev.start_ns, ev.start_ns + ev.duration_ns))
    busy = _union_ms(intervals)
    per = lambda x: x / steps  # noqa: E731
    rows = []
    for component in [c for c, _ in COMPONENTS] + ["collectives", "other"]:
        row = {"component": component, **{p: per(table[component, p]) for p in PHASES}}
        row["total"] = sum(row[p] for p in PHASES)
        rows.append(row)
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:30]
    return {
        "steps": steps, "rows": rows,
        "kernel_sum_ms": per(sum(table.values())), "busy_ms": per(busy),
        "recompute_ms": per(sum(v for (c, p), v in table.items() if p == "recompute")),
        "unmatched_ms": per(unmatched), "other_modules_ms": per(other_modules),
        "top_kernels": [{"kernel": n[:120], "ms": per(v[0]), "count": v[1] / steps, "hlo_op": v[2],
                         "op_name": v[3][-160:]} for n, v in top],
    }


def _union_ms(intervals) -> float:
    total, end = 0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total / 1e6


def format_table(result: dict, step_ms: float | None = None) -> str:
    ref = step_ms or result["busy_ms"]
    lines = [f"{'component':<40}{'fwd ms':>8}{'remat ms':>9}{'bwd ms':>8}{'total':>8}{'share':>7}"]
    for r in sorted(result["rows"], key=lambda r: -r["total"]):
        if r["total"] > 0:
            lines.append(f"{r['component']:<40}{r['forward']:>8.1f}{r['recompute']:>9.1f}{r['backward']:>8.1f}"
                         f"{r['total']:>8.1f}{r['total'] / ref:>7.1%}")
    lines.append(f"{'kernels (sum)':<40}{'':>33}{result['kernel_sum_ms']:>8.1f}")
    lines.append(f"{'device busy (union of kernels)':<40}{'':>33}{result['busy_ms']:>8.1f}")
    if step_ms:
        lines.append(f"{'step (wall, median, untraced)':<40}{'':>33}{step_ms:>8.1f}")
        lines.append(f"{'device idle (step - busy)':<40}{'':>33}{step_ms - result['busy_ms']:>8.1f}")
    lines.append(f"rematerialised recompute in all: {result['recompute_ms']:.1f} ms; kernels of no known HLO op: "
                 f"{result['unmatched_ms']:.1f} ms; other modules: {result['other_modules_ms']:.1f} ms")
    return "\n".join(lines)


def load_xspace(path: str):
    from jax.profiler import ProfileData

    data = open(path, "rb").read()
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    return ProfileData.from_serialized_xspace(data)


def read_text(path: str) -> str:
    return (gzip.open(path, "rt") if path.endswith(".gz") else open(path)).read()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--xplane", required=True)
    p.add_argument("--hlo", required=True, help="the compiled module's text (compiled.as_text())")
    p.add_argument("--steps", type=int, default=1, help="steps the trace holds")
    p.add_argument("--step-ms", type=float, default=None)
    p.add_argument("--out", default="")
    args = p.parse_args()
    result = breakdown(load_xspace(args.xplane), read_text(args.hlo), args.steps)
    print(format_table(result, args.step_ms))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""results.json -> results.md: the acceptance comparison, importance tables, block and hardware tables."""

from __future__ import annotations

import numpy as np

_METRICS = ("retrieval_accuracy", "lm_loss", "answer_loss", "mc_accuracy")


def _table(header, rows) -> list[str]:
    fmt = lambda x: f"{x:.4g}" if isinstance(x, float) else str(x)
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]


def write_markdown(r: dict, path) -> None:
    L = r["num_layers"]
    out = [f"# PostNAS results ({r['device']}, {L} layers, budget {r['budget']} full-attention layers)", "",
           f"Objective of the placement search: {r['objective']} (weights on task scores). Uniform placement: "
           f"{r['uniform']}. Layers are 0-indexed. Wall time per stage (s): {r['timings_s']}.", "",
           "## Searched vs uniform placement (fresh linear blocks, same distillation, per seed)", ""]
    rows = []
    for s in r["seeds"]:
        for name in ("searched", "uniform"):
            f = s["final"][name]
            rows.append([s["seed"], name, f["placement"], *(f[m] for m in _METRICS)])
    for name, m in r["reference"].items():
        rows.append(["-", name, list(range(L)), *(m[k] for k in _METRICS)])
    out += _table(["seed", "placement", "attention layers", *_METRICS], rows)
    wins = [s["final"]["searched"]["retrieval_accuracy"] > s["final"]["uniform"]["retrieval_accuracy"]
            for s in r["seeds"]]
    gap = [s["final"]["searched"]["retrieval_accuracy"] - s["final"]["uniform"]["retrieval_accuracy"]
           for s in r["seeds"]]
    out += ["", f"Searched beats uniform on retrieval in {sum(wins)} of {len(wins)} seeds "
            f"(accuracy difference per seed {[round(g, 4) for g in gap]}, mean {np.mean(gap):.4f}).", ""]
    out += ["## Per-layer importance (supernet score with only that layer on attention, minus none)", ""]
    for s in r["seeds"]:
        out += [f"Seed {s['seed']}: supernet distillation loss {s['supernet_loss'][0]:.4g} -> "
                f"{s['supernet_loss'][1]:.4g}; beam search scored {s['placements_evaluated']} placements (single "
                f"layers included); searched "
                f"{s['placement']} (objective {s['objective']:.4g})", ""]
        if "exhaustive_best" in s:
            out += [f"Every placement scored in the supernet as a check: best {s['exhaustive_best']} (beam search "
                    f"{'agrees' if s['beam_matches_exhaustive'] else 'differs'}); uniform ranks "
                    f"{s['uniform_rank']} of {s['num_placements']}.", ""]
        rows = [[t, v["best"], *[round(x, 4) for x in v["importance"]]] for t, v in s["per_task"].items()]
        out += _table(["task", "best placement", *[f"L{i}" for i in range(L)]], rows) + [""]
    out += ["## Linear-attention block selection (same placement, same recipe)", ""]
    rows = [[b["block"], *(b[m] for m in _METRICS), b["train_tokens_per_s"], b["decode_tokens_per_s"]]
            for b in r["blocks"]]
    out += _table(["block", *_METRICS, "train tok/s (supernet step)", "decode tok/s (one block)"], rows)
    out += ["", f"## Hardware-aware grid at state size {r['state_size']} per layer (nh * dk * dv)", ""]
    rows = [[h["num_heads"], h["head_dim"], h["head_v_dim"], *(h[m] for m in _METRICS), h["decode_tokens_per_s"],
             "yes" if h["pareto"] else ""] for h in r["hardware"]]
    out += _table(["heads", "dk", "dv", *_METRICS, "decode tok/s (model)", "Pareto"], rows)
    out += ["", f"JetBlock shape handed to train.py: {r['chosen_jet']}; config: `{r['searched_config']}`", ""]
    with open(path, "w") as f:
        f.write("\n".join(out))

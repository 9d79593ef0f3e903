"""Run metrics: console lines, metrics.jsonl, TensorBoard event files, and a loss-curve PNG at the end.

Only process 0 writes; every process computes the same (global) values.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    h, rem = divmod(int(seconds), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch wherever it is installed
    only to accept torch tensors (we log floats), ~3 s of every run's start on a CPU host."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError while tensorboardX loads
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """`resume_step`: the step a run restarts from. Rows written after it by the interrupted run are dropped
    (they are replayed), so metrics.jsonl, TensorBoard and the plot hold each step once."""

    def __init__(self, workdir: Path, enabled: bool, tensorboard: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.jsonl = Path(workdir) / "metrics.jsonl"
        self.tb_dir = Path(workdir) / "tensorboard"
        self.png = Path(workdir) / "loss.png"
        self._tb = None
        if enabled:
            self._truncate_after(resume_step)
        if enabled and tensorboard:
            SummaryWriter = _summary_writer_class()
            # purge_step: TensorBoard hides the events this run's earlier life wrote from that step on
            self._tb = SummaryWriter(str(self.tb_dir), purge_step=resume_step + 1 if resume_step else None)

    def _truncate_after(self, step: int) -> None:
        rows = self.history()
        keep = [r for r in rows if r.get("step", 0) <= step]
        if len(keep) == len(rows):
            return
        tmp = self.jsonl.with_name(self.jsonl.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        tmp.replace(self.jsonl)

    def write(self, step: int, scalars: dict, extra: dict | None = None) -> None:
        """`extra`: fields for metrics.jsonl only (not TensorBoard), such as the first step's startup times."""
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"step": step, **scalars, **(extra or {})}) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                tag = f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"
                self._tb.add_scalar(tag, v, step)

    def console(self, step: int, total: int, scalars: dict, eta_s: float) -> None:
        if not self.enabled:
            return
        if "loss" not in scalars:  # a validation row
            print(f"step {step:>{len(str(total))}}/{total}  validation "
                  + "  ".join(f"{k[5:]} {v:,.0f}" if k == "eval_tokens" else f"{k[5:]} {v:.4f}"
                              for k, v in scalars.items() if k.startswith("eval_")), flush=True)
            return
        parts = [f"step {step:>{len(str(total))}}/{total}", f"loss {scalars['loss']:.4f}"]
        for key, fmt in (("kl", "kl {:.4f}"), ("mse", "mse {:.4f}"), ("lr", "lr {:.2e}"),
                         ("grad_norm", "gnorm {:.3f}"), ("tokens_per_s", "{:,.0f} tok/s"),
                         ("step_s", "{:.3f} s/step"), ("mfu_frozen_aware", "MFU {:.1%}"),
                         ("mfu_6n", "(6N {:.1%})")):
            if key in scalars:
                parts.append(fmt.format(scalars[key]))
        parts.append(f"ETA {format_eta(eta_s)}")
        print("  ".join(parts), flush=True)

    def history(self) -> list[dict]:
        if not self.jsonl.exists():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def close(self) -> Path | None:
        if not self.enabled:
            return None
        if self._tb is not None:
            self._tb.close()
        rows = self.history()
        train = [r for r in rows if "loss" in r]
        evals = [r for r in rows if "eval_loss" in r]
        if not train and not evals:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="validation")
            ax.legend()
        ax.set(xlabel="step", ylabel="loss", title="loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.png, dpi=100)
        plt.close(fig)
        return self.png


class Throughput:
    """Tokens/s and step time over the steps since the last report (compile time excluded after step 1)."""

    def __init__(self):
        self._t, self._steps, self._tokens = time.perf_counter(), 0, 0.0

    def add(self, tokens: float) -> None:
        self._steps += 1
        self._tokens += tokens

    def report(self) -> tuple[float, float]:
        now = time.perf_counter()
        dt = max(now - self._t, 1e-9)
        out = (self._tokens / dt, dt / max(self._steps, 1))
        self._t, self._steps, self._tokens = now, 0, 0.0
        return out

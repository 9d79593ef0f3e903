"""Run metrics: console lines, metrics.jsonl, TensorBoard event files, and a loss-curve PNG at the end.

Only process 0 writes; every process computes the same (global) values.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    h, rem = divmod(int(seconds), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class MetricsWriter:
    def __init__(self, workdir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.jsonl = Path(workdir) / "metrics.jsonl"
        self.tb_dir = Path(workdir) / "tensorboard"
        self.png = Path(workdir) / "loss.png"
        self._tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.tb_dir))

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"train/{k}", v, step)

    def console(self, step: int, total: int, scalars: dict, eta_s: float) -> None:
        if not self.enabled:
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
        rows = [r for r in self.history() if "loss" in r]
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
        ax.set(xlabel="step", ylabel="loss", title="training loss")
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

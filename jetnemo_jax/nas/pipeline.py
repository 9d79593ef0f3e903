"""PostNAS end to end: teacher, supernet, placement search, block selection, hardware-aware grid, hand-off.

Per seed: distil a supernet with sampled placements, beam-search the placement under the budget, then
train the searched and the uniform placement the same way from fresh linear blocks and evaluate both
(the acceptance comparison). Once (first seed's placement): every candidate block in the same recipe,
and the (heads, dk, dv) grid at a fixed state size. Writes results.json, results.md,
searched_config.py (for train.py) and searched_config.json (HF config.json of the hybrid).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jetnemo_jax import sharding
from jetnemo_jax.checkpoint import hf
from jetnemo_jax.checkpoint.hf_export import save_hf
from jetnemo_jax.config import JetBlockConfig
from jetnemo_jax.data import sources
from jetnemo_jax.data.splits import split_documents
from jetnemo_jax.nas import config as nas_config
from jetnemo_jax.nas import evaluators, handoff, hardware, search, supernet, tasks
from jetnemo_jax.nas.blocks import make_block, state_size
from jetnemo_jax.nas.report import write_markdown
from jetnemo_jax.train import loop, program
from jetnemo_jax.train.config import check_keys, default_config, to_model_config


class Candidate:
    """One supernet shape (block kind + sizes) over the teacher: compiled once, reused for every seed,
    placement and step count."""

    def __init__(self, cfg, block: str, teacher_params, seed: int):
        self.cfg, self.block, self.teacher_params = cfg, block, teacher_params
        self.split, self.init_params, self.frozen = supernet.build(cfg, block, teacher_params, seed)
        split = self.split
        self._stats = jax.jit(lambda p, f, t, s, m: evaluators.next_token_stats(
            split.merge(p, f)(t, m, segment_ids=s), t))
        self._distillers = {}

    def fresh(self, seed: int) -> dict:
        """Newly initialised linear blocks (the frozen base is shared)."""
        return supernet.build(self.cfg, self.block, self.teacher_params, seed)[1]

    def distiller(self, c, steps: int) -> supernet.Distiller:
        if steps not in self._distillers:
            n = self.cfg.num_hidden_layers
            self._distillers[steps] = supernet.Distiller(
                self.split, c.optim, steps, mse_layers=tuple(c.supernet.mse_layers) or tuple(range(n)),
                mse_weight=c.supernet.mse_weight, kl_weight=c.supernet.kl_weight, ce_weight=c.supernet.ce_weight)
        return self._distillers[steps]

    def evaluate(self, params, placement, evals: dict) -> dict:
        mask = jnp.asarray(supernet.placement_mask(placement, self.cfg.num_hidden_layers))
        fn = lambda tokens, seg: self._stats(params, self.frozen, tokens, seg, mask)
        return {name: e(fn) for name, e in evals.items()}


def _objective(metrics: dict, weights: dict) -> float:
    return sum(w * metrics[task]["score"] for task, w in weights.items() if w)


def _jet(c) -> JetBlockConfig:
    return JetBlockConfig(**c.model.jet.to_dict())


def _teacher(c, workdir: Path, tok, data_fn):
    """(all-attention model config with the jet section, its parameters, its HF directory)."""
    t = c.teacher
    if t.mode == "hf":
        model = hf.load_hf_model(t.path, dtype=c.model.dtype)
        return model.config.replace(jet=_jet(c)), nnx.state(model, nnx.Param), t.path
    if t.mode != "train":
        raise ValueError(f"teacher.mode={t.mode!r}: expected 'train' (a tiny teacher trained here) or 'hf'")
    run = default_config()
    run.model = c.model
    run.model.layer_types = ("attn",) * len(c.model.layer_types)
    run.optim = c.optim
    run.train.steps = t.steps
    run.data.global_batch = c.data.text_rows + c.data.recall_rows
    run.data.seq_len = c.data.seq_len
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    prog = program.build(run, mesh)
    trainable, frozen, teacher_own = loop.initial_params(run, prog)
    state = prog.init_state(trainable)
    for i in range(t.steps):
        state, m = prog.step_fn(state, frozen, teacher_own, data_fn(i))
        if (i + 1) % max(t.steps // 5, 1) == 0:
            print(f"  teacher step {i + 1}/{t.steps}: loss {float(m['loss']):.3f}", flush=True)
    model = prog.split.merge(state["params"], frozen)
    directory = workdir / "teacher_hf"
    save_hf(model, directory, dtype="float32", overwrite=True, tokenizer_dir=tok.path)
    cfg = to_model_config(run.model).replace(jet=_jet(c))
    return cfg, nnx.state(model, nnx.Param), str(directory)


def _eval_sets(c, held_out, tok, seed: int) -> dict:
    rng = np.random.default_rng(seed + 10_000)  # evaluation data never changes with the run seed
    e = c.eval
    lm_iter = tasks.text_rows(held_out, tok.encode, tok.eos_id, rows=e.lm_rows, seq_len=c.data.seq_len, seed=seed)
    rows = e.rows_per_call
    evals = {"lm": evaluators.LMLoss(next(lm_iter), rows)}
    items = (tasks.mc_items_from_jsonl(e.mc_jsonl, tok.encode) if e.mc_jsonl else
             tasks.cloze_items(held_out, tok.encode, rng, num_items=e.mc_items, context_len=e.mc_context,
                               answer_len=e.mc_answer, num_choices=e.mc_choices))
    evals["mc"] = evaluators.MultipleChoice(items, pad_id=tok.eos_id, rows_per_call=rows)
    evals["retrieval"] = evaluators.Retrieval(tasks.recall(c.data.recall, rng, e.retrieval_rows, c.data.seq_len,
                                                           num_pairs=c.data.mqar_pairs, vocab_size=c.data.recall_vocab),
                                              rows)
    return evals


def _flat(metrics: dict) -> dict:
    return {k: v for m in metrics.values() for k, v in m.items() if k != "score"}


class _Run:
    """What every stage shares: config, data stream, evaluators, teacher, the JetBlock supernet, timings."""

    def __init__(self, c):
        self.c, self.t0 = c, time.perf_counter()
        self.workdir = Path(c.workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.timings, self._since = {}, self.t0
        d = c.data
        texts = sources.open_source(d.source, d.text_key)
        train_docs, held_out = split_documents(texts, d.held_out, 0)
        self.tok = loop.get_tokenizer(c, self.workdir, train_docs)
        self._text = tasks.text_rows(train_docs, self.tok.encode, self.tok.eos_id, rows=d.text_rows,
                                     seq_len=d.seq_len, seed=0)
        self._data_rng = np.random.default_rng(0)
        self.evals = _eval_sets(c, held_out, self.tok, 0)
        self.lap("setup")
        self.cfg, self.teacher_params, self.teacher_dir = _teacher(c, self.workdir, self.tok, self.batch)
        self.lap("teacher")
        self.L = self.cfg.num_hidden_layers
        self.jet = Candidate(self.cfg, c.supernet.block, self.teacher_params, c.seeds[0])

    def batch(self, _step=None) -> dict:
        d = self.c.data
        return tasks.mixture(self._text, self._data_rng, recall_kind=d.recall, recall_rows=d.recall_rows,
                             seq_len=d.seq_len, num_pairs=d.mqar_pairs, vocab_size=d.recall_vocab)

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._since, 1)
        self._since = now
        print(f"[{name}] {self.timings[name]} s", flush=True)

    def train_fixed(self, cand: Candidate, placement, seed: int) -> dict:
        """Fresh linear blocks trained at a fixed placement, then evaluated: the metrics and the step time."""
        mask = supernet.placement_mask(placement, self.L)
        dist = cand.distiller(self.c, self.c.fixed.steps)
        params, hist = dist.run(cand.fresh(seed), cand.frozen, self.batch, lambda i: mask,
                                label=f"{cand.block} at attention layers {list(placement)}")
        return {**_flat(cand.evaluate(params, placement, self.evals)), "final_distill_loss": hist[-1]["loss"],
                "seconds_per_step": dist.seconds_per_step}

    def seed(self, seed: int, uniform) -> dict:
        """Supernet, search, then the searched and the uniform placement trained the same way."""
        c, L, jet = self.c, self.L, self.jet
        budget, weights = c.search.budget, dict(c.search.objective)
        rng = np.random.default_rng(seed)
        lo, hi = c.supernet.min_attn, (c.supernet.max_attn if c.supernet.max_attn >= 0 else budget)
        params, hist = jet.distiller(c, c.supernet.steps).run(
            jet.fresh(seed), jet.frozen, self.batch, lambda i: supernet.sample_placement(rng, L, lo, hi),
            label=f"supernet seed {seed}")
        self.lap(f"supernet seed {seed}")
        metrics = {}

        def metrics_at(p):
            if p not in metrics:
                metrics[p] = jet.evaluate(params, p, self.evals)
            return metrics[p]

        objective = search.Memo(lambda p: _objective(metrics_at(p), weights))
        found = search.beam_search(objective, L, budget, c.search.beam_width)
        out = {"seed": seed, "supernet_loss": [hist[0]["loss"], hist[-1]["loss"]], "placement": list(found.placement),
               "objective": found.score, "placements_evaluated": found.evaluated, "per_task": {}}
        for task in self.evals:
            memo = search.Memo(lambda p, task=task: metrics_at(p)[task]["score"])
            out["per_task"][task] = {"importance": search.importance(memo, L),
                                     "best": list(search.beam_search(memo, L, budget, c.search.beam_width).placement)}
        if math.comb(L, budget) <= c.search.exhaustive_max:  # small spaces: rank every placement as well
            ranked = search.exhaustive_search(objective, L, budget).rounds[0]
            order = [p for p, _ in ranked]
            out.update(exhaustive_best=list(ranked[0][0]), beam_matches_exhaustive=ranked[0][0] == found.placement,
                       uniform_rank=order.index(uniform) + 1, num_placements=len(order),
                       supernet_scores={str(list(p)): v for p, v in ranked})
        self.lap(f"search seed {seed}")
        out["final"] = {name: {"placement": list(p), **self.train_fixed(jet, p, seed + 1000)}
                        for name, p in (("searched", found.placement), ("uniform", uniform))}
        self.lap(f"final training seed {seed}")
        f = out["final"]
        print(f"  seed {seed}: searched {f['searched']['placement']} retrieval "
              f"{f['searched']['retrieval_accuracy']:.3f}, uniform {f['uniform']['placement']} "
              f"{f['uniform']['retrieval_accuracy']:.3f}", flush=True)
        return out

    def blocks(self, placement) -> list[dict]:
        """Every candidate block in the same recipe at `placement`, with training and decode throughput."""
        c, cfg, rows = self.c, self.cfg, []
        tokens_per_step = c.data.seq_len * (c.data.text_rows + c.data.recall_rows)
        for kind in c.blocks.kinds:
            cand = self.jet if kind == c.supernet.block else Candidate(cfg, kind, self.teacher_params, c.seeds[0])
            r = self.train_fixed(cand, placement, c.seeds[0])
            rows.append({"block": kind, **r, "train_tokens_per_s": tokens_per_step / r["seconds_per_step"],
                         "decode_tokens_per_s": hardware.block_decode_tokens_per_s(
                             make_block(kind, cfg, rngs=nnx.Rngs(0)), cfg.hidden_size, batch=c.blocks.decode_batch,
                             steps=c.blocks.decode_steps, dtype=jnp.dtype(cfg.dtype))})
            self.lap(f"block {kind}")
        return rows

    def hardware(self, placement, size: int) -> list[dict]:
        """The (heads, dk, dv) grid at state `size`: accuracy proxy and the whole model's decode tokens/s."""
        c, cfg, hc, rows = self.c, self.cfg, self.c.hardware, []
        layer_types = tuple("attn" if i in placement else "jet" for i in range(self.L))
        for point in hardware.grid(size, hc.head_dims, hc.value_dims, hc.heads, cfg.jet.generator_reduction):
            pcfg = cfg.replace(jet=hardware.jet_config(cfg.jet, point))
            same = c.supernet.block == "jet" and pcfg.jet == cfg.jet
            cand = self.jet if same else Candidate(pcfg, "jet", self.teacher_params, c.seeds[0])
            rows.append({"num_heads": point[0], "head_dim": point[1], "head_v_dim": point[2],
                         **self.train_fixed(cand, placement, c.seeds[0]),
                         "decode_tokens_per_s": hardware.model_decode_tokens_per_s(
                             pcfg.replace(layer_types=layer_types), batch=hc.decode_batch,
                             context=hc.decode_context, steps=hc.decode_steps)})
            self.lap(f"hardware {point}")
        for row, front in zip(rows, hardware.pareto(rows, ("decode_tokens_per_s", hc.proxy_metric))):
            row["pareto"] = front
        return rows

    def handoff(self, placement, jet: dict, importance: dict) -> None:
        """searched_config.py (train.py: stage 1 of the searched hybrid) and searched_config.json (HF)."""
        c, w = self.c, self.workdir
        layer_types = tuple("attn" if i in placement else "jet" for i in range(self.L))
        searched = self.cfg.replace(layer_types=layer_types, jet=hardware.jet_config(
            self.cfg.jet, (jet["num_heads"], jet["head_dim"], jet["head_v_dim"])))
        kwargs = {"layer_types": layer_types, "jet": jet, "init_path": str(self.teacher_dir)}
        if c.handoff.preset:
            kwargs["preset"] = c.handoff.preset
        else:
            kwargs["model"] = handoff.model_dict(searched)
        overrides = c.handoff.overrides.to_dict()
        overrides["data"] = {"source": c.data.source, "text_key": c.data.text_key, "tokenizer": str(self.tok.path),
                             **overrides.get("data", {})}
        kwargs["overrides"] = {"workdir": str(w / "stage1"), **overrides}
        table = "\n".join(f"  {t}: {[round(x, 4) for x in v['importance']]}" for t, v in importance.items())
        handoff.write_config(w / "searched_config.py", header=(
            f"Stage-1 training of the hybrid PostNAS found (written by `python -m jetnemo_jax.nas`, seed "
            f"{c.seeds[0]}).\n\nFull attention at layers {list(placement)} of {self.L} (0-indexed); per-layer "
            f"importance (score with only that layer on attention minus none):\n{table}\n\n"
            f"    python train.py --config {w / 'searched_config.py'}\n"), **kwargs)
        (w / "searched_config.json").write_text(json.dumps(searched.to_hf_dict(), indent=2))


def run(c) -> dict:
    check_keys(c, nas_config.default_config())
    r = _Run(c)
    L, budget, hc = r.L, c.search.budget, c.hardware
    reference = {"teacher (all attention)": _flat(r.jet.evaluate(r.jet.init_params, tuple(range(L)), r.evals))}
    print(f"  teacher: {reference}", flush=True)
    uniform = search.uniform_placement(L, budget)
    per_seed = [r.seed(seed, uniform) for seed in c.seeds]
    placement = tuple(per_seed[0]["placement"])
    blocks = r.blocks(placement)
    size = hc.state_size or state_size(r.cfg)
    hw = r.hardware(placement, size)
    best = max((h for h in hw if h["pareto"]), key=lambda h: (h[hc.proxy_metric], h["decode_tokens_per_s"]))
    source = best if hc.apply else dataclasses.asdict(r.cfg.jet)
    chosen_jet = {k: source[k] for k in ("num_heads", "head_dim", "head_v_dim")}
    r.handoff(placement, chosen_jet, per_seed[0]["per_task"])
    r.timings["total"] = round(time.perf_counter() - r.t0, 1)
    results = {"config": json.loads(c.to_json_best_effort()), "device": jax.devices()[0].device_kind,
               "num_layers": L, "budget": budget, "uniform": list(uniform), "objective": dict(c.search.objective),
               "reference": reference, "seeds": per_seed, "blocks": blocks, "hardware": hw, "state_size": size,
               "chosen_jet": chosen_jet, "timings_s": r.timings,
               "searched_config": str(r.workdir / "searched_config.py")}
    (r.workdir / "results.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, r.workdir / "results.md")
    print(f"results: {r.workdir / 'results.md'}\nsearched config: {r.workdir / 'searched_config.py'}", flush=True)
    return results

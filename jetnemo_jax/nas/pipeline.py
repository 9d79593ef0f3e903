"""PostNAS end to end: teacher, supernet, placement search, block selection, hardware-aware grid, hand-off.

Per seed: distil a supernet with sampled placements, beam-search the placement under the budget, then
train the searched and the uniform placement the same way from fresh linear blocks and evaluate both
(the acceptance comparison). Once (first seed's placement): every candidate block in the same recipe,
and the (heads, dk, dv) grid at a fixed state size. Writes results.json, results.md,
searched_config.py (for train.py) and searched_config.json (HF config.json of the hybrid).
"""

from __future__ import annotations

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
from jetnemo_jax.nas import evaluators, handoff, hardware, search, supernet, tasks
from jetnemo_jax.nas.blocks import make_block, state_size
from jetnemo_jax.nas.report import write_markdown
from jetnemo_jax.train import loop, program
from jetnemo_jax.train.config import default_config, to_model_config


class Candidate:
    """One supernet shape (block kind + sizes) over the teacher: compiled once, reused for every seed,
    placement and step count."""

    def __init__(self, cfg, block: str, teacher_params, seed: int):
        self.cfg, self.block, self.teacher_params = cfg, block, teacher_params
        self.split, self.init_params, self.frozen = supernet.build(cfg, block, teacher_params, seed)
        split = self.split
        self._apply = jax.jit(lambda p, f, t, s, m: split.merge(p, f)(t, m, segment_ids=s))
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
        fn = lambda tokens, seg: self._apply(params, self.frozen, tokens, seg, mask)
        return {name: e(fn) for name, e in evals.items()}


def _objective(metrics: dict, weights: dict) -> float:
    return sum(w * metrics[task]["score"] for task, w in weights.items())


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
    evals = {"lm": evaluators.LMLoss([next(lm_iter)])}
    items = (tasks.mc_items_from_jsonl(e.mc_jsonl, tok.encode) if e.mc_jsonl else
             tasks.cloze_items(held_out, tok.encode, rng, num_items=e.mc_items, context_len=e.mc_context,
                               answer_len=e.mc_answer, num_choices=e.mc_choices))
    evals["mc"] = evaluators.MultipleChoice(items, pad_id=tok.eos_id)
    evals["retrieval"] = evaluators.Retrieval(tasks.recall(c.data.recall, rng, e.retrieval_rows, c.data.seq_len,
                                                           num_pairs=c.data.mqar_pairs, vocab_size=c.data.recall_vocab))
    return evals


def _flat(metrics: dict) -> dict:
    return {k: v for m in metrics.values() for k, v in m.items() if k != "score"}


def run(c) -> dict:
    t0 = time.perf_counter()
    workdir = Path(c.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    timings = {}

    def lap(name, since):
        timings[name] = round(time.perf_counter() - since, 1)
        print(f"[{name}] {timings[name]} s", flush=True)
        return time.perf_counter()

    texts = sources.open_source(c.data.source, c.data.text_key)
    train_docs, held_out = tasks.split_documents([texts[i] for i in range(len(texts))], c.data.held_out, 0)
    tok = loop.get_tokenizer(c, workdir, train_docs)
    d = c.data
    text_iter = tasks.text_rows(train_docs, tok.encode, tok.eos_id, rows=d.text_rows, seq_len=d.seq_len, seed=0)
    data_rng = np.random.default_rng(0)

    def data_fn(_):
        return tasks.mixture(text_iter, data_rng, recall_kind=d.recall, recall_rows=d.recall_rows, seq_len=d.seq_len,
                             num_pairs=d.mqar_pairs, vocab_size=d.recall_vocab)

    evals = _eval_sets(c, held_out, tok, 0)
    since = lap("setup", t0)
    cfg, teacher_params, teacher_dir = _teacher(c, workdir, tok, data_fn)
    since = lap("teacher", since)
    L, budget = cfg.num_hidden_layers, c.search.budget
    weights = dict(c.search.objective)
    jet = Candidate(cfg, c.supernet.block, teacher_params, c.seeds[0])
    reference = {"teacher (all attention)": _flat(jet.evaluate(jet.init_params, tuple(range(L)), evals))}
    print(f"  teacher: {reference}", flush=True)
    uniform = search.uniform_placement(L, budget)

    per_seed = []
    for seed in c.seeds:
        params = jet.fresh(seed)
        rng = np.random.default_rng(seed)
        lo, hi = c.supernet.min_attn, (c.supernet.max_attn if c.supernet.max_attn >= 0 else budget)
        params, hist = jet.distiller(c, c.supernet.steps).run(
            params, jet.frozen, data_fn, lambda i: supernet.sample_placement(rng, L, lo, hi))
        since = lap(f"supernet seed {seed}", since)
        memo_metrics = {}

        def metrics_at(p):
            p = tuple(sorted(p))
            if p not in memo_metrics:
                memo_metrics[p] = jet.evaluate(params, p, evals)
            return memo_metrics[p]

        objective = search.Memo(lambda p: _objective(metrics_at(p), weights))
        found = search.beam_search(objective, L, budget, c.search.beam_width)
        per_task = {}
        for task in evals:
            memo = search.Memo(lambda p, task=task: metrics_at(p)[task]["score"])
            per_task[task] = {"importance": search.importance(memo, L),
                              "best": list(search.beam_search(memo, L, budget, c.search.beam_width).placement)}
        check = {}
        if math.comb(L, budget) <= c.search.exhaustive_max:  # small spaces: rank every placement as well
            ranked = search.exhaustive_search(objective, L, budget).rounds[0]
            order = [p for p, _ in ranked]
            check = {"exhaustive_best": list(ranked[0][0]), "beam_matches_exhaustive": ranked[0][0] == found.placement,
                     "uniform_rank": order.index(uniform) + 1, "num_placements": len(order),
                     "supernet_scores": {str(list(p)): v for p, v in ranked}}
        since = lap(f"search seed {seed}", since)
        final = {}
        for name, placement in (("searched", found.placement), ("uniform", uniform)):
            p, h = jet.distiller(c, c.fixed.steps).run(
                jet.fresh(seed + 1000), jet.frozen, data_fn, lambda i, m=supernet.placement_mask(placement, L): m)
            final[name] = {"placement": list(placement), **_flat(jet.evaluate(p, placement, evals)),
                           "final_distill_loss": h[-1]["loss"]}
        since = lap(f"final training seed {seed}", since)
        print(f"  seed {seed}: searched {list(found.placement)} retrieval "
              f"{final['searched']['retrieval_accuracy']:.3f}, uniform {list(uniform)} "
              f"{final['uniform']['retrieval_accuracy']:.3f}", flush=True)
        per_seed.append({"seed": seed, "supernet_loss": [hist[0]["loss"], hist[-1]["loss"]],
                         "placement": list(found.placement), "objective": found.score,
                         "placements_evaluated": len(memo_metrics), "per_task": per_task, "final": final,
                         **check})
    placement = tuple(per_seed[0]["placement"])
    mask = supernet.placement_mask(placement, L)

    blocks = []
    for kind in c.blocks.kinds:
        cand = jet if kind == c.supernet.block else Candidate(cfg, kind, teacher_params, c.seeds[0])
        dist = cand.distiller(c, c.fixed.steps)
        p, h = dist.run(cand.fresh(c.seeds[0]), cand.frozen, data_fn, lambda i: mask)
        block = make_block(kind, cfg, rngs=nnx.Rngs(0))
        blocks.append({"block": kind, **_flat(cand.evaluate(p, placement, evals)),
                       "train_tokens_per_s": d.seq_len * (d.text_rows + d.recall_rows) / dist.seconds_per_step,
                       "decode_tokens_per_s": hardware.block_decode_tokens_per_s(
                           block, cfg.hidden_size, batch=c.blocks.decode_batch, steps=c.blocks.decode_steps,
                           dtype=jnp.dtype(cfg.dtype))})
        since = lap(f"block {kind}", since)

    hw = []
    hc = c.hardware
    size = hc.state_size or state_size(cfg)
    layer_types = tuple("attn" if m else "jet" for m in mask)
    for point in hardware.grid(size, hc.head_dims, hc.value_dims, hc.heads, cfg.jet.generator_reduction):
        pcfg = cfg.replace(jet=hardware.jet_config(cfg.jet, point))
        same = c.supernet.block == "jet" and pcfg.jet == cfg.jet
        cand = jet if same else Candidate(pcfg, "jet", teacher_params, c.seeds[0])
        p, _ = cand.distiller(c, c.fixed.steps).run(cand.fresh(c.seeds[0]), cand.frozen, data_fn, lambda i: mask)
        row = {"num_heads": point[0], "head_dim": point[1], "head_v_dim": point[2],
               **_flat(cand.evaluate(p, placement, evals)),
               "decode_tokens_per_s": hardware.model_decode_tokens_per_s(
                   pcfg.replace(layer_types=layer_types), batch=hc.decode_batch, context=hc.decode_context,
                   steps=hc.decode_steps)}
        hw.append(row)
        since = lap(f"hardware {point}", since)
    proxy = hc.proxy_metric
    for row, front in zip(hw, hardware.pareto(hw, ("decode_tokens_per_s", proxy))):
        row["pareto"] = front
    best_hw = max((r for r in hw if r["pareto"]), key=lambda r: (r[proxy], r["decode_tokens_per_s"]))
    chosen_jet = {k: best_hw[k] for k in ("num_heads", "head_dim", "head_v_dim")} if hc.apply else \
        {"num_heads": cfg.jet.num_heads, "head_dim": cfg.jet.head_dim, "head_v_dim": cfg.jet.head_v_dim}

    # Hand-off: the searched placement (and JetBlock shape) as a train.py config and an HF config.json.
    searched_cfg = cfg.replace(layer_types=layer_types, jet=hardware.jet_config(
        cfg.jet, (chosen_jet["num_heads"], chosen_jet["head_dim"], chosen_jet["head_v_dim"])))
    kwargs = dict(layer_types=layer_types, jet=chosen_jet, init_path=str(teacher_dir))
    if c.handoff.preset:
        kwargs["preset"] = c.handoff.preset
    else:
        kwargs["model"] = handoff.model_dict(searched_cfg)
    overrides = c.handoff.overrides.to_dict()
    overrides["data"] = {"source": c.data.source, "text_key": c.data.text_key, "tokenizer": str(tok.path),
                         **overrides.get("data", {})}
    kwargs["overrides"] = {"workdir": str(workdir / "stage1"), **overrides}
    imp = per_seed[0]["per_task"]
    handoff.write_config(workdir / "searched_config.py", header=(
        f"Stage-1 training of the hybrid PostNAS found (written by `python -m jetnemo_jax.nas`, seed "
        f"{c.seeds[0]}).\n\nFull attention at layers {list(placement)} of {L} (0-indexed); per-layer importance "
        f"(score with only that layer on attention minus none):\n" +
        "\n".join(f"  {t}: {[round(x, 4) for x in v['importance']]}" for t, v in imp.items()) +
        f"\n\n    python train.py --config {workdir / 'searched_config.py'}\n"), **kwargs)
    (workdir / "searched_config.json").write_text(json.dumps(searched_cfg.to_hf_dict(), indent=2))

    timings["total"] = round(time.perf_counter() - t0, 1)
    results = {"config": json.loads(c.to_json_best_effort()), "device": jax.devices()[0].device_kind,
               "num_layers": L, "budget": budget, "uniform": list(uniform), "objective": weights,
               "reference": reference, "seeds": per_seed, "blocks": blocks, "hardware": hw,
               "state_size": size, "chosen_jet": chosen_jet, "timings_s": timings,
               "searched_config": str(workdir / "searched_config.py")}
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, workdir / "results.md")
    print(f"results: {workdir / 'results.md'}\nsearched config: {workdir / 'searched_config.py'}", flush=True)
    return results

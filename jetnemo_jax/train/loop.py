"""The training run: distributed set-up, tokenizer, data, initial weights or resume, the loop, the end.

Crash safety: checkpoints are atomic (Orbax), taken every `checkpoint.every` steps and on SIGTERM; a
restart with the same workdir resumes from the newest checkpoint that restores, with the data stream at
the same position, so a killed run loses only the steps since its last save.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jetnemo_jax import sharding
from jetnemo_jax.data import sources
from jetnemo_jax.data import tokenizer as tokenizer_lib
from jetnemo_jax.data.pipeline import packed_dataset
from jetnemo_jax.model import JetNemotronForCausalLM
from jetnemo_jax.train import flops
from jetnemo_jax.train.checkpointing import RunCheckpoints
from jetnemo_jax.train.config import check_keys
from jetnemo_jax.train.metrics import MetricsWriter, Throughput
from jetnemo_jax.train.program import Program, build

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    pass


def initialize_distributed(dcfg) -> None:
    """Multi-process runs: explicit config/env (GPU and CPU clusters) or JAX's auto-detection (TPU pods)."""
    mode = dcfg.mode
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed.mode={mode!r}: expected auto, on or off")
    address = dcfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num = dcfg.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
    pid = dcfg.process_id if dcfg.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
    multi_host_tpu = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
    if mode == "off" or (mode == "auto" and not (address or multi_host_tpu)):
        return
    kwargs = {}
    if address:
        kwargs = {"coordinator_address": address, "num_processes": num or None,
                  "process_id": pid if pid >= 0 else None}
    if dcfg.cpu_collectives and jax.config.jax_platforms in (None, "", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", dcfg.cpu_collectives)
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})


def get_tokenizer(config, workdir: Path, source) -> tokenizer_lib.Tokenizer:
    d = config.data
    if d.tokenizer:
        return tokenizer_lib.load_tokenizer(d.tokenizer, d.eos_token or None)
    if d.source != sources.BUNDLED:
        raise ValueError("data.tokenizer is empty: set it to a local HF tokenizer directory (only the bundled "
                         f"{sources.BUNDLED!r} corpus trains its own)")
    # Small corpora: a BPE trained on the data itself, deterministic, so every process gets the same one.
    n = min(len(source), 5000)
    return tokenizer_lib.train_bpe((source[i] for i in range(n)), config.model.vocab_size, workdir / "tokenizer")


def _place(flat: dict, abstract: dict) -> dict:
    """Host arrays -> global arrays with the abstract values' shardings and dtypes (multi-host safe)."""
    def one(x, a):
        x = np.asarray(x, dtype=a.dtype)
        if x.shape != a.shape:
            raise ValueError(f"shape {x.shape} where the model expects {a.shape}")
        return jax.make_array_from_callback(a.shape, a.sharding, lambda idx: x[idx])
    return {n: one(flat[n], a) for n, a in abstract.items()}


def _same_architecture(a, b) -> bool:
    strip = dict(dtype="float32", param_dtype="float32", gdr_impl="auto", conv_impl="auto")
    return dataclasses.replace(a, **strip) == dataclasses.replace(b, **strip)


def initial_params(config, program: Program) -> tuple[dict, dict, dict]:
    """(trainable, frozen, teacher_own) as sharded global arrays, per `config.init`."""
    mode, path, cfg = config.init.mode, config.init.path, program.model_config
    split = program.split
    if mode == "random" and program.teacher is not None:
        raise ValueError("distill.enabled with init.mode='random': the teacher needs pre-trained weights "
                         "(init.mode='qwen2')")
    if mode not in ("random", "qwen2", "params"):
        raise ValueError(f"init.mode={mode!r}: expected random, qwen2 or params")
    if mode != "random" and not path:
        raise ValueError(f"init.mode={mode!r} needs init.path")
    from jetnemo_jax.checkpoint import hf, orbax_params, qwen2_to_jet

    # Weights are built or read on the host, then each process places its shards. (Initialising inside a
    # jitted function instead compiles one random-number program per tensor: minutes for a 2B model on GPU.)
    cpu = jax.local_devices(backend="cpu")[0]
    teacher_src = None
    with jax.default_device(cpu):
        if mode == "random":
            model = JetNemotronForCausalLM(cfg, rngs=nnx.Rngs(config.seed))
        elif mode == "qwen2":
            model, _ = qwen2_to_jet.qwen2_to_jet(path, cfg, layer_types=cfg.layer_types, seed=config.seed,
                                                 param_dtype=cfg.param_dtype)
            teacher_src = hf.load_hf_model(path) if program.teacher is not None else None
        else:
            if program.teacher is not None:
                raise ValueError("distill.enabled with init.mode='params': the teacher is built from the "
                                 "original Qwen2.5 weights (init.mode='qwen2')")
            model = (orbax_params.load_params(path) if os.path.isdir(os.path.join(path, "params"))
                     else hf.load_hf_model(path))
    if not _same_architecture(model.config, cfg):
        raise ValueError(f"init.path {path}: its model config differs from config.model:\n  checkpoint "
                         f"{model.config}\n  config     {cfg}")
    trainable, frozen = split.split(nnx.state(model, nnx.Param))
    teacher_own = (program.teacher.own_params(teacher_src) if teacher_src is not None else {})
    return (_place(trainable, program.abstract_state["params"]), _place(frozen, program.abstract_frozen),
            _place(teacher_own, program.abstract_teacher))


class _Signals:
    """SIGTERM (preemption, scheduler stop): save a checkpoint at the next step boundary and exit."""

    def __init__(self):
        self.stop = False
        self._old = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.stop = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


def _global_batch(program: Program, local: dict) -> dict:
    B = program.config.data.global_batch
    return {k: jax.make_array_from_process_local_data(program.batch_sharding, np.asarray(v, np.int32),
                                                      (B, *v.shape[1:]))
            for k, v in local.items()}


def run(config) -> dict:
    """Train per `config`; returns {"workdir", "checkpoint", "metrics", "plot", "final_loss", "steps"}."""
    check_keys(config)
    initialize_distributed(config.distributed)
    workdir = Path(config.workdir).absolute()
    main = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    d = config.data
    n_proc = jax.process_count()
    if d.global_batch % n_proc:
        raise ValueError(f"data.global_batch={d.global_batch} is not divisible by {n_proc} processes")

    mesh = sharding.make_mesh(dict(config.mesh))
    program = build(config, mesh)
    cfg = program.model_config
    div = sharding.batch_divisor(mesh, config.sharding_rules)
    if d.global_batch % (div * config.train.microbatches):
        raise ValueError(f"data.global_batch={d.global_batch} must be a multiple of the batch-sharded devices "
                         f"({div}) x train.microbatches ({config.train.microbatches})")

    source = sources.open_source(d.source, d.text_key)
    tok = get_tokenizer(config, workdir, source)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size={cfg.vocab_size}")
    data = iter(packed_dataset(source, tok.encode, tok.eos_id, seq_len=d.seq_len, global_batch=d.global_batch,
                               seed=config.seed, num_shards=d.num_shards, process_index=jax.process_index(),
                               process_count=n_proc, shuffle=d.shuffle, worker_count=d.worker_count))

    ckpt = RunCheckpoints(workdir, every=config.checkpoint.every, keep=config.checkpoint.keep,
                          async_save=config.checkpoint.async_save)
    start, state = ckpt.restore_latest(program.abstract_state, data)
    frozen_abs = {"frozen": program.abstract_frozen, "teacher": program.abstract_teacher}
    if state is not None:
        fixed = ckpt.restore_frozen(frozen_abs) if ckpt.has_frozen() else {"frozen": {}, "teacher": {}}
        frozen, teacher_own = fixed["frozen"], fixed["teacher"]
        if main:
            print(f"resumed from {ckpt.directory}/{start} (step {start})", flush=True)
    else:
        trainable, frozen, teacher_own = initial_params(config, program)
        state = program.init_state(trainable)
        if frozen or teacher_own:
            ckpt.save_frozen({"frozen": frozen, "teacher": teacher_own})
        start = 0

    n_train = sum(math.prod(a.shape) for a in program.abstract_state["params"].values())
    n_frozen = sum(math.prod(a.shape) for a in program.abstract_frozen.values())
    kind = jax.devices()[0].device_kind
    peak = flops.peak_flops(kind)
    fpt = program.flops_per_token
    if main:
        print(f"model: {len(cfg.layer_types)} layers {''.join(t[0] for t in cfg.layer_types)} (a=attn s=swa "
              f"j=jet), {n_train:,} trainable + {n_frozen:,} frozen parameters; mesh "
              f"{dict(mesh.shape)} over {jax.device_count()} {kind} devices, {n_proc} process(es)", flush=True)
        print(f"data: {d.source} ({len(source):,} documents), tokenizer {tok.path} ({tok.vocab_size} tokens), "
              f"batch {d.global_batch} x {d.seq_len}; FLOPs/token frozen-aware {fpt['frozen_aware']:.3g}, "
              f"6N {fpt['6N']:.3g}", flush=True)

    writer = MetricsWriter(workdir, enabled=main)
    signals = _Signals()
    total = config.train.steps
    tokens_per_step = d.global_batch * d.seq_len
    throughput, t_start, steps_timed = Throughput(), None, 0
    pending = None  # (step, metrics on device) of the previous step, fetched after the next is dispatched

    def finish(step_no, metrics_dev) -> dict:
        m = {k: float(v) for k, v in jax.device_get(metrics_dev).items()}
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])) and config.train.nonfinite == "stop":
            ckpt.wait()
            last = ckpt.latest_step()
            where = f"{ckpt.directory}/{last}" if last is not None else "none (no checkpoint was saved)"
            raise NonFiniteLoss(f"non-finite loss {m['loss']} / grad norm {m['grad_norm']} at step {step_no}; "
                                f"last good checkpoint: {where}")
        return m

    def report(step_no, m):
        if step_no > start + 1:  # the first step's time is mostly compilation
            throughput.add(tokens_per_step)
        if step_no % config.train.log_every and step_no != total:
            return
        tps, step_s = throughput.report()
        if tps > 0:
            m.update(tokens_per_s=tps, step_s=step_s)
        if peak and tps > 0:
            per_chip = tps / jax.device_count()
            m.update(mfu_frozen_aware=per_chip * fpt["frozen_aware"] / peak, mfu_6n=per_chip * fpt["6N"] / peak)
        writer.write(step_no, m)
        elapsed = time.perf_counter() - t_start if t_start else float("nan")
        eta = elapsed / max(steps_timed, 1) * (total - step_no)
        writer.console(step_no, total, m, eta)

    step_no = start
    try:
        while step_no < total:
            batch = _global_batch(program, next(data))
            state, metrics = program.step_fn(state, frozen, teacher_own, batch)
            step_no += 1
            if pending is not None:
                report(pending[0], finish(*pending))
            pending = (step_no, metrics)
            if t_start is None:  # time from the end of the first (compiling) step
                jax.block_until_ready(metrics)
                t_start = time.perf_counter()
                throughput = Throughput()
            else:
                steps_timed += 1
            stop = signals.stop
            if n_proc > 1:  # all processes must stop at the same step: agree at log steps (a host sync)
                stop = (step_no % config.train.log_every == 0
                        and bool(multihost_utils.process_allgather(np.asarray(stop)).any()))
            if ckpt.should_save(step_no) or stop or step_no == total:
                m = finish(*pending)  # never save a state whose loss is not finite
                report(*pending[:1], m)
                pending = None
                ckpt.save(step_no, state, data, force=True)
            if stop:
                ckpt.wait()
                if main:
                    print(f"SIGTERM: saved step {step_no} to {ckpt.directory}; exiting", flush=True)
                break
        if pending is not None:
            report(pending[0], finish(*pending))
    finally:
        signals.restore()
        ckpt.wait()
        ckpt.close()
    plot = writer.close()
    history = writer.history() if main else []
    final = export_final(program, state, frozen, tok, workdir / "final") if step_no == total else None
    result = {"workdir": str(workdir), "checkpoint": str(ckpt.directory), "final": final,
              "metrics": str(writer.jsonl),
              "tensorboard": str(writer.tb_dir), "plot": str(plot) if plot else None, "steps": step_no,
              "final_loss": history[-1]["loss"] if history else None}
    if step_no == total and config.train.sample_prompt and config.train.sample_tokens > 0:
        sample = greedy_sample(program, state, frozen, tok, config.train.sample_prompt, config.train.sample_tokens)
        if main:
            print(f"sample: {sample!r}", flush=True)
        result["sample"] = sample
    if main:
        print(f"checkpoints: {result['checkpoint']}\nfinal weights: {final}\nmetrics: {result['metrics']} (TensorBoard: "
              f"{result['tensorboard']})\nloss plot: {result['plot']}", flush=True)
    return result


def export_final(program: Program, state, frozen, tok, directory: Path) -> str:
    """The trained model as `config.json` + `params/` (+ tokenizer): what init.mode='params',
    `convert_torch_ckpt.py jax-to-hf` and generation read."""
    import orbax.checkpoint as ocp

    from jetnemo_jax.checkpoint.orbax_params import PARAMS_DIR, save_params

    model = program.split.merge(state["params"], frozen)
    tokenizer_files = {}
    if tok.path is not None:
        tokenizer_files = {f.name: f.read_text() for f in Path(tok.path).iterdir()
                           if f.name in ("tokenizer.json", "tokenizer_config.json")}
    if jax.process_count() == 1:
        save_params(model, directory, overwrite=True, extra_files=tokenizer_files)
    else:  # Orbax coordinates the processes' writes; process 0 writes the small files
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(directory / PARAMS_DIR, nnx.to_pure_dict(nnx.state(model, nnx.Param)), force=True)
        if jax.process_index() == 0:
            import json

            (directory / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2))
            for name, text in tokenizer_files.items():
                (directory / name).write_text(text)
    return str(directory)


def greedy_sample(program: Program, state, frozen, tok, prompt: str, n_tokens: int) -> str:
    """A short greedy continuation of `prompt` (jetnemo_jax.generate: cached prefill and decode)."""
    from jetnemo_jax.generate import generate

    ids = tok.encode(prompt) if prompt else np.asarray([tok.eos_id], np.int32)
    out = generate(program.split.merge(state["params"], frozen), [ids.tolist()], max_new_tokens=n_tokens)
    return prompt + tok.decode(out.tokens[0, :out.lengths[0]])

"""The training run: distributed set-up, tokenizer, data, initial weights or resume, the loop, the end.

Crash safety: checkpoints are atomic (Orbax), taken every `checkpoint.every` steps and on SIGTERM; a
restart with the same workdir resumes from the newest checkpoint that restores, with the data stream at
the same position, so a killed run loses only the steps since its last save.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jetnemo_jax import config as model_config_lib
from jetnemo_jax import sharding
from jetnemo_jax.data import sources
from jetnemo_jax.data import tokenizer as tokenizer_lib
from jetnemo_jax.data.pipeline import count_tokens_upto, packed_dataset
from jetnemo_jax.data.splits import split_documents
from jetnemo_jax.model import JetNemotronForCausalLM
from jetnemo_jax.train import flops, run_config, startup
from jetnemo_jax.train.checkpointing import RunCheckpoints
from jetnemo_jax.train.config import check_keys, check_values, resolve_init_path
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


def get_tokenizer(config, workdir: Path, source, vocab_size: int | None = None) -> tokenizer_lib.Tokenizer:
    """data.tokenizer's, or for the bundled corpus a BPE of `vocab_size` (default model.vocab_size) trained here."""
    d = config.data
    if d.tokenizer:
        return tokenizer_lib.load_tokenizer(d.tokenizer, d.eos_token or None)
    if d.source != sources.BUNDLED:
        raise ValueError("data.tokenizer is empty: set it to a local HF tokenizer directory (only the bundled "
                         f"{sources.BUNDLED!r} corpus trains its own)")
    # Small corpora: a BPE trained on the data itself, deterministic, so every process (and every restart)
    # gets the same one. Written under a temporary name, then swapped in: a crash leaves a whole one or none.
    out = workdir / "tokenizer"
    tmp = workdir / f".tokenizer.tmp-{jax.process_index()}-{os.getpid()}"
    n = min(len(source), 5000)
    tok = tokenizer_lib.train_bpe((source[i] for i in range(n)), vocab_size or config.model.vocab_size, tmp)
    shutil.rmtree(out, ignore_errors=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process of this run swapped in the same tokenizer first (shared workdir)
        shutil.rmtree(tmp, ignore_errors=True)
    tok.path = out
    return tok


def _place(flat: dict, abstract: dict) -> dict:
    """Host arrays -> global arrays with the abstract values' shardings and dtypes (multi-host safe)."""
    def one(x, a):
        x = np.asarray(x, dtype=a.dtype)
        if x.shape != a.shape:
            raise ValueError(f"shape {x.shape} where the model expects {a.shape}")
        return jax.make_array_from_callback(a.shape, a.sharding, lambda idx: x[idx])
    return {n: one(flat[n], a) for n, a in abstract.items()}


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
    from jetnemo_jax.checkpoint import auto, hf, qwen2_to_jet

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
            model = auto.load_model(path)
    numerics = {k: getattr(cfg, k) for k in model_config_lib.NUMERICS_FIELDS}
    diff = model_config_lib.config_diff(model.config.replace(**numerics), cfg)
    if diff:
        raise ValueError(f"init.path {path}: the checkpoint's model differs from config.model (checkpoint != "
                         "config):\n  " + "\n  ".join(diff))
    trainable, frozen = split.split(nnx.state(model, nnx.Param))
    teacher_own = (program.teacher.own_params(teacher_src) if teacher_src is not None else {})
    return (_place(trainable, program.abstract_state["params"]), _place(frozen, program.abstract_frozen),
            _place(teacher_own, program.abstract_teacher))


class _Signals:
    """SIGTERM (preemption, scheduler stop) and SIGINT (Ctrl-C): save a checkpoint at the next step boundary
    and exit. A second Ctrl-C interrupts at once (KeyboardInterrupt), losing the steps since the last save."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = None
        self._old = {s: signal.signal(s, self._handler) for s in self.SIGNALS}

    @property
    def stop(self) -> bool:
        return self.received is not None

    def _handler(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        if jax.process_index() == 0:
            print(f"{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then exiting "
                  "(Ctrl-C again to abort without saving)", flush=True)

    def restore(self):
        for s, old in self._old.items():
            signal.signal(s, old)


def _global_batch(program: Program, local: dict) -> dict:
    B = program.config.data.global_batch
    return {k: jax.make_array_from_process_local_data(program.batch_sharding, np.asarray(v, np.int32),
                                                      (B, *v.shape[1:]))
            for k, v in local.items()}


def check_tokenizer(tok: tokenizer_lib.Tokenizer, cfg, init_mode: str) -> None:
    """Refuse a tokenizer that cannot be the model's (data.check_tokenizer=False skips this)."""
    where = f"tokenizer {tok.path or '(trained here)'}"
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"{where} has {tok.vocab_size:,} tokens but model.vocab_size={cfg.vocab_size:,}: ids "
                         "past the embedding table (or set data.check_tokenizer=False)")
    if cfg.eos_token_id is not None and tok.eos_id != cfg.eos_token_id:
        raise ValueError(f"{where} ends documents with id {tok.eos_id} but the model's eos_token_id is "
                         f"{cfg.eos_token_id}: not this model's tokenizer (or set data.check_tokenizer=False)")
    # A pretrained model's embedding rows are its tokenizer's ids; only padding may be added (Qwen2.5: 151,665
    # tokens, 151,936 rows).
    if init_mode != "random" and tok.vocab_size < 0.9 * cfg.vocab_size:
        raise ValueError(f"{where} has {tok.vocab_size:,} tokens but the pretrained model's vocabulary has "
                         f"{cfg.vocab_size:,}: not this model's tokenizer (or set data.check_tokenizer=False)")


@dataclasses.dataclass
class RunData:
    tokenizer: tokenizer_lib.Tokenizer
    train: object  # grain iterator of local rows (checkpointed with the state)
    describe: str  # one line for the console
    eval_batches: list  # fixed validation batches (local rows), empty when off


def open_data(config, program: Program, workdir: Path) -> RunData:
    """Tokenizer, training stream and validation batches, each checked before any step runs."""
    d = config.data
    source = sources.open_source(d.source, d.text_key)
    eval_source, eval_note = None, "off"
    if d.eval_source:
        eval_source = sources.open_source(d.eval_source, d.text_key)
        eval_note = f"{d.eval_source} ({len(eval_source):,} documents)"
    elif d.eval_split > 0 and config.train.eval_every > 0:
        if len(source) > 1:
            source, eval_source = split_documents(source, d.eval_split, config.seed)
            eval_note = f"{len(eval_source):,} document(s) of data.source held out (data.eval_split={d.eval_split})"
        else:
            eval_note = "off (data.source has one document: nothing to hold out)"
    tok = get_tokenizer(config, workdir, source, program.model_config.vocab_size)
    if d.check_tokenizer:
        check_tokenizer(tok, program.model_config, config.init.mode)
    one_batch = d.global_batch * d.seq_len
    have = count_tokens_upto(source, tok.encode, one_batch)  # open_source refused sources without text
    if have < one_batch and jax.process_index() == 0:
        print(f"warning: data.source {d.source!r} holds only {have:,} tokens, fewer than one batch "
              f"({d.global_batch} x {d.seq_len} = {one_batch:,}): every batch repeats the same data", flush=True)
    n_proc = jax.process_count()
    kw = dict(seq_len=d.seq_len, global_batch=d.global_batch, seed=config.seed, num_shards=d.num_shards,
              process_index=jax.process_index(), process_count=n_proc)
    train = iter(packed_dataset(source, tok.encode, tok.eos_id, shuffle=d.shuffle, worker_count=d.worker_count,
                                **kw))
    eval_batches = []
    if eval_source is not None and config.train.eval_every > 0:
        it = iter(packed_dataset(eval_source, tok.encode, tok.eos_id, shuffle=False, **kw))
        eval_batches = [next(it) for _ in range(config.train.eval_batches)]
    describe = (f"data: {d.source} ({len(source):,} documents), tokenizer {tok.path} ({tok.vocab_size} tokens), "
                f"batch {d.global_batch} x {d.seq_len}; validation: {eval_note}")
    return RunData(tok, train, describe, eval_batches)


def saved_frozen(config, program: Program, ckpt: RunCheckpoints):
    """(frozen, teacher_own, rebuilt) of a run with checkpoints: from its frozen/, or (frozen/ deleted by hand)
    the initial weights rebuilt from init.path."""
    if not (program.abstract_frozen or program.abstract_teacher):
        return {}, {}, False
    if ckpt.has_frozen():
        fixed = ckpt.restore_frozen({"frozen": program.abstract_frozen, "teacher": program.abstract_teacher})
        return fixed["frozen"], fixed["teacher"], False
    _, frozen, teacher_own = initial_params(config, program)
    return frozen, teacher_own, True


def restore_or_init(config, program: Program, ckpt: RunCheckpoints, data_iterator):
    """(start step, state, frozen, teacher_own): from the newest checkpoint that restores, else fresh."""
    start, state = ckpt.restore_latest(program.abstract_state, data_iterator)
    if state is None:
        trainable, frozen, teacher_own = initial_params(config, program)
        if frozen or teacher_own:
            ckpt.save_frozen({"frozen": frozen, "teacher": teacher_own})
        return 0, program.init_state(trainable), frozen, teacher_own
    frozen, teacher_own, rebuilt = saved_frozen(config, program, ckpt)
    if rebuilt:
        ckpt.save_frozen({"frozen": frozen, "teacher": teacher_own})
    if jax.process_index() == 0:
        done = start >= config.train.steps
        print(f"resumed from {ckpt.directory}/{start} (step {start})" + (
            f": the run is complete (train.steps={config.train.steps}); raise train.steps to train further"
            if done else ""), flush=True)
    return start, state, frozen, teacher_own


def run(config) -> dict:
    """Train per `config`; returns {"workdir", "checkpoint", "final", "metrics", "plot", "final_loss", "steps",
    "signal", "startup"} ("signal": the signal number that stopped the run after saving, else None; "startup":
    the time to first step, train/startup.py)."""
    clock = startup.StartupClock()
    check_keys(config)
    check_values(config)
    note = resolve_init_path(config)
    if note:
        log.info(note)
    initialize_distributed(config.distributed)
    workdir = Path(config.workdir).absolute()
    main = jax.process_index() == 0
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"workdir={config.workdir}: cannot create the run's directory there "
                         f"({e.strerror or e})") from e
    d = config.data
    n_proc = jax.process_count()
    if d.global_batch % n_proc:
        raise ValueError(f"data.global_batch={d.global_batch} is not divisible by {n_proc} processes")

    mesh = sharding.make_mesh(dict(config.mesh))
    program = build(config, mesh)
    cfg = program.model_config
    ctx = sharding.context_size(mesh, config.sharding_rules)
    if d.seq_len % ctx:
        raise ValueError(f"data.seq_len={d.seq_len} must be a multiple of the context-parallel devices ({ctx}): "
                         "every sequence is split into that many shards")
    div = sharding.batch_divisor(mesh, config.sharding_rules)
    if d.global_batch % (div * config.train.microbatches):
        raise ValueError(f"data.global_batch={d.global_batch} must be a multiple of the batch-sharded devices "
                         f"({div}) x train.microbatches ({config.train.microbatches})")

    ckpt = RunCheckpoints(workdir, every=config.checkpoint.every, keep=config.checkpoint.keep,
                          async_save=config.checkpoint.async_save)
    try:
        accepted = run_config.check(workdir, config, cfg, has_checkpoint=ckpt.latest_step() is not None)
        with clock.phase("data"):
            data = open_data(config, program, workdir)
        start, state, frozen, teacher_own = restore_or_init(config, program, ckpt, data.train)
        if main:  # only once the checkpoints are known to fit this config
            run_config.save(workdir, config, cfg)
            if accepted:
                print("resuming with changed config (checkpoint.allow_changes):\n  " + "\n  ".join(accepted),
                      flush=True)
    except BaseException:
        ckpt.close()
        raise

    n_train = sum(math.prod(a.shape) for a in program.abstract_state["params"].values())
    n_frozen = sum(math.prod(a.shape) for a in program.abstract_frozen.values())
    kind = jax.devices()[0].device_kind
    if main:
        print(f"model: {len(cfg.layer_types)} layers {''.join(t[0] for t in cfg.layer_types)} (a=attn s=swa "
              f"j=jet), {n_train:,} trainable + {n_frozen:,} frozen parameters; mesh "
              f"{dict(mesh.shape)} over {jax.device_count()} {kind} devices, {n_proc} process(es)", flush=True)
        fpt = program.flops_per_token
        teacher = f", teacher forward {fpt['teacher_forward']:.3g}" if fpt["teacher_forward"] else ""
        print(f"{data.describe}; FLOPs/token frozen-aware {fpt['frozen_aware']:.3g}, 6N {fpt['6N']:.3g}{teacher}",
              flush=True)

    writer = MetricsWriter(workdir, enabled=main, resume_step=start)
    signals = _Signals()
    try:
        step_no, state = _train(config, program, ckpt, writer, signals, data, start, state, frozen, teacher_own,
                                clock)
    finally:
        signals.restore()
        ckpt.wait()
        ckpt.close()
        _close(data.train)
    plot = writer.close()
    history = [r for r in writer.history() if "loss" in r] if main else []
    total = config.train.steps
    stopped = signals.received if step_no < total else None
    final = export_final(program, state, frozen, data.tokenizer, workdir / "final") if step_no == total else None
    result = {"workdir": str(workdir), "checkpoint": str(ckpt.directory), "final": final,
              "metrics": str(writer.jsonl), "tensorboard": str(writer.tb_dir), "plot": str(plot) if plot else None,
              "steps": step_no, "final_loss": history[-1]["loss"] if history else None, "signal": stopped,
              "startup": clock.result}
    if step_no == total and config.train.sample_prompt and config.train.sample_tokens > 0:
        sample = greedy_sample(program, state, frozen, data.tokenizer, config.train.sample_prompt,
                               config.train.sample_tokens)
        if main:
            print(f"sample: {sample!r}", flush=True)
        result["sample"] = sample
    if main:
        print(f"checkpoints: {result['checkpoint']}\nfinal weights: {final}\nmetrics: {result['metrics']} "
              f"(TensorBoard: {result['tensorboard']})\nloss plot: {result['plot']}", flush=True)
        if clock.result is not None:
            print(startup.line(clock.result), flush=True)
    return result


def _close(iterator) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


def _train(config, program: Program, ckpt: RunCheckpoints, writer: MetricsWriter, signals: _Signals,
           data: RunData, start: int, state, frozen, teacher_own, clock: startup.StartupClock):
    """The loop from `start` to train.steps (or a signal); returns (last step, state). The first step's row is
    always logged, with the time to first step (`clock`)."""
    d = config.data
    main = jax.process_index() == 0
    n_proc = jax.process_count()
    peak = flops.peak_flops(jax.devices()[0].device_kind)
    fpt = program.flops_per_token
    total = config.train.steps
    tokens_per_step = d.global_batch * d.seq_len
    throughput, t_start, steps_timed = Throughput(), None, 0
    pending = None  # (step, metrics on device) of the previous step, fetched after the next is dispatched
    eval_batches = [_global_batch(program, b) for b in data.eval_batches]

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
        first = step_no == start + 1
        if not first:  # the first step's time is mostly compilation
            throughput.add(tokens_per_step)
        if step_no % config.train.log_every and step_no != total and not first:
            return
        tps, step_s = throughput.report() if not first else (0.0, 0.0)
        if tps > 0:
            m.update(tokens_per_s=tps, step_s=step_s)
        if peak and tps > 0:
            per_chip = tps / jax.device_count()
            m.update(mfu_frozen_aware=per_chip * fpt["frozen_aware"] / peak, mfu_6n=per_chip * fpt["6N"] / peak)
            if fpt["teacher_forward"]:  # the distillation teacher's forward too (counted apart: train/flops.py)
                m.update(mfu_with_teacher=per_chip * (fpt["frozen_aware"] + fpt["teacher_forward"]) / peak)
        writer.write(step_no, m, extra=clock.finish() if first else None)
        elapsed = time.perf_counter() - t_start if t_start else float("nan")
        eta = elapsed / max(steps_timed, 1) * (total - step_no)
        writer.console(step_no, total, m, eta)

    def validate(step_no):
        sums = {}
        for batch in eval_batches:
            for k, v in jax.device_get(program.eval_fn(state["params"], frozen, teacher_own, batch)).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        tokens = sums.pop("tokens")
        if tokens == 0:
            return
        m = {"eval_loss": sums.pop("ce") / tokens, **{f"eval_{k}": v / tokens for k, v in sums.items()},
             "eval_tokens": tokens}
        writer.write(step_no, m)
        writer.console(step_no, total, m, float("nan"))

    step_no = start
    while step_no < total:
        with clock.phase("data") if t_start is None else contextlib.nullcontext():
            batch = _global_batch(program, next(data.train))
        if t_start is None:  # the first step: compiled, then run
            with clock.phase("compile"):
                state, metrics = program.step_fn(state, frozen, teacher_own, batch)
                jax.block_until_ready(metrics)
            if main:
                print(startup.line(clock.finish()), flush=True)
        else:
            state, metrics = program.step_fn(state, frozen, teacher_own, batch)
        step_no += 1
        if pending is not None:
            report(pending[0], finish(*pending))
        pending = (step_no, metrics)
        if t_start is None:  # time from the end of the first (compiling) step
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
            ckpt.save(step_no, state, data.train, force=True)
        if eval_batches and (step_no % config.train.eval_every == 0 or step_no == total):
            validate(step_no)
        if stop:
            ckpt.wait()
            if main:
                name = signal.Signals(signals.received).name if signals.received else "stop"
                print(f"{name}: saved step {step_no} to {ckpt.directory}; exiting", flush=True)
            break
    if pending is not None:
        report(pending[0], finish(*pending))
    return step_no, state


def export_checkpoint(config, step: int | None, directory: str) -> str:
    """The run's checkpoint at `step` (its newest if None) written to the new `directory` as final/ is: what
    generation, evaluation and `convert_torch_ckpt.py jax-to-hf` read. `config`: the run's (its workdir)."""
    import orbax.checkpoint as ocp

    check_keys(config)
    check_values(config)
    resolve_init_path(config)  # as the run did: its saved config holds the resolved path
    workdir, dst = Path(config.workdir).absolute(), Path(directory).absolute()
    if not (workdir / "checkpoints").is_dir():
        raise ValueError(f"workdir={config.workdir}: no checkpoints/ to export (a training run's workdir?)")
    if dst.exists():
        raise ValueError(f"--export={directory}: exists (choose a new directory)")
    program = build(config, sharding.make_mesh(dict(config.mesh)))
    ckpt = RunCheckpoints(workdir, every=config.checkpoint.every, keep=config.checkpoint.keep, async_save=False)
    try:
        steps = sorted(ckpt.manager.all_steps())
        step = steps[-1] if step is None and steps else step
        if step not in steps:
            what = "--export" if step is None else f"--export_step={step}"
            raise ValueError(f"{what}: {ckpt.directory} holds steps {steps or 'none'}")
        run_config.check(workdir, config, program.model_config, has_checkpoint=True)
        state = ckpt.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(program.abstract_state)))["state"]
        frozen = saved_frozen(config, program, ckpt)[0]
    finally:
        ckpt.close()
    d = config.data
    tok = tokenizer_lib.load_tokenizer(d.tokenizer or workdir / "tokenizer", d.eos_token or None)
    return export_final(program, state, frozen, tok, dst)


def export_final(program: Program, state, frozen, tok, directory: Path) -> str:
    """The trained model as `config.json` + `params/` (+ tokenizer): what init.mode='params',
    `convert_torch_ckpt.py jax-to-hf` and generation read."""
    import orbax.checkpoint as ocp

    from jetnemo_jax.checkpoint.orbax_params import PARAMS_DIR, save_params

    _, param_dtypes = program.split.abstract()  # frozen weights held in the compute dtype go out as stored
    frozen = {n: v.astype(param_dtypes[n].dtype) for n, v in frozen.items()}
    model = program.split.merge(state["params"], frozen)
    if model.config.eos_token_id is None and tok.eos_id is not None:  # a model trained here: its tokenizer's EOS
        model.config = model.config.replace(eos_token_id=tok.eos_id)
    files = tokenizer_lib.tokenizer_files(tok)
    if jax.process_count() == 1:
        save_params(model, directory, overwrite=True, extra_files=files)
    else:  # Orbax coordinates the processes' writes; process 0 writes the small files
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(directory / PARAMS_DIR, nnx.to_pure_dict(nnx.state(model, nnx.Param)), force=True)
        if jax.process_index() == 0:
            import json

            (directory / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2))
            for name, text in files.items():
                (directory / name).write_text(text)
    return str(directory)


def greedy_sample(program: Program, state, frozen, tok, prompt: str, n_tokens: int) -> str:
    """A short greedy continuation of `prompt` (jetnemo_jax.generate: cached prefill and decode)."""
    from jetnemo_jax.generate import generate

    ids = tok.encode(prompt) if prompt else np.asarray([tok.eos_id], np.int32)
    out = generate(program.split.merge(state["params"], frozen), [ids.tolist()], max_new_tokens=n_tokens)
    return prompt + tok.decode(out.tokens[0, :out.lengths[0]])

"""The lm-evaluation-harness adapter, offline: local YAML tasks over jsonl files, a tiny random model with the
Qwen2.5 vocabulary; the harness's scores must equal direct computations from the model's logits."""

import os

import jax
import numpy as np
import pytest

try:
    import lm_eval
except ImportError as e:  # optional dependency: the `eval` extra
    pytest.skip(f"lm_eval is not importable ({e})", allow_module_level=True)

from jetnemo_jax.cli import UserError
from jetnemo_jax.eval.lm_eval_adapter import JetNemoLM, main
from jetnemo_jax.generate import generate
from tests.test_generate import forward_right_padded

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASKS = ["jetnemo_tiny_mc", "jetnemo_tiny_rolling", "jetnemo_tiny_gen"]


@pytest.fixture(scope="module")
def results(qwen_tokenizer_dir, tiny_qwen_vocab_checkpoint):
    from lm_eval.tasks import TaskManager

    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    ckpt, model = tiny_qwen_vocab_checkpoint
    # Through the registry and a model_args string, as the lm_eval CLI does (float32 for exact comparisons).
    lm = lm_eval.api.registry.get_model("jetnemo").create_from_arg_string(
        f"checkpoint={ckpt},tokenizer={qwen_tokenizer_dir},dtype=float32,max_length=64", {"batch_size": 2})
    cwd = os.getcwd()
    os.chdir(REPO)  # the task files name their data relative to the repository root
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=TASKS, log_samples=True, bootstrap_iters=0,
                                      task_manager=TaskManager(include_path=os.path.join(REPO, "tests/eval/data")))
    finally:
        os.chdir(cwd)
    return out, lm


def logprobs(model, pairs):
    """[(ids, n_cont)] -> [(log p(last n_cont tokens | the rest), whether they are all the argmax)]."""
    out = []
    for (ids, n), logits in zip(pairs, forward_right_padded(model, [p[:-1] for p, _ in pairs])):
        lp = np.asarray(jax.nn.log_softmax(logits, -1), np.float64)
        cols = np.arange(len(ids) - 1 - n, len(ids) - 1)
        targets = np.asarray(ids)[cols + 1]
        out.append((lp[cols, targets].sum(), bool((np.asarray(logits)[cols].argmax(-1) == targets).all())))
    return out


def test_multiple_choice_loglikelihoods_equal_direct(results):
    out, lm = results
    samples = out["samples"]["jetnemo_tiny_mc"]
    assert len(samples) == 3 and "acc,none" in out["results"]["jetnemo_tiny_mc"]
    pairs, got = [], []
    for s in samples:
        for (context, continuation), resp in zip(s["arguments"], s["resps"]):
            if context:
                ctx = lm.tok_encode(context)
                cont = lm.tok_encode(context + continuation)[len(ctx):]
            else:
                ctx, cont = [lm.eot_token_id], lm.tok_encode(continuation)
            pairs.append((ctx + cont, len(cont)))
            got.append(resp[0])
    assert len(pairs) == 7  # 3 + 2 + 2 choices, the empty context included
    for (lp, greedy), (expect, expect_greedy) in zip(got, logprobs(lm.model, pairs)):
        assert abs(float(lp) - expect) <= 1e-4 * max(1.0, abs(expect)) and greedy == expect_greedy


def test_rolling_loglikelihood_equals_full_forward(results):
    out, lm = results
    samples = out["samples"]["jetnemo_tiny_rolling"]
    assert len(samples) == 2
    ids = [[lm.eot_token_id] + lm.tok_encode(s["arguments"][0][0]) for s in samples]  # each < max_length
    for s, (expect, _) in zip(samples, logprobs(lm.model, [(i, len(i) - 1) for i in ids])):
        assert abs(float(s["resps"][0][0]) - expect) <= 1e-4 * abs(expect)


def test_generate_until_equals_generate(results):
    out, lm = results
    samples = out["samples"]["jetnemo_tiny_gen"]
    assert len(samples) == 3
    for s in samples:
        context = s["arguments"][0][0]
        prompt = lm.tok_encode(context) or [lm.eot_token_id]
        g = generate(lm.model, [prompt], max_new_tokens=6, stop_tokens=[lm.eot_token_id])
        text = lm.tok_decode(g.tokens[0, :g.lengths[0]]).split("\n")[0].split(".")[0]
        assert s["resps"][0][0] == text


def test_bad_arguments_are_clear(qwen_tokenizer_dir, tiny_qwen_vocab_checkpoint, tmp_path):
    ckpt, _ = tiny_qwen_vocab_checkpoint
    with pytest.raises(UserError, match="exactly one"):
        JetNemoLM(tokenizer=qwen_tokenizer_dir)
    with pytest.raises(UserError, match="auto"):
        JetNemoLM(ckpt, qwen_tokenizer_dir, batch_size="auto")
    with pytest.raises(UserError, match="holds no tokenizer: pass tokenizer= DIR"):
        JetNemoLM(ckpt)  # this checkpoint carries no tokenizer files
    with pytest.raises(UserError, match="checkpoint= .*no such directory"):
        JetNemoLM(str(tmp_path / "missing"), qwen_tokenizer_dir)


def test_cli_defaults_and_mistakes(qwen_tokenizer_dir, tiny_qwen_vocab_checkpoint, tmp_path, capsys):
    """lm_eval's CLI passes device="cuda:0" unless told otherwise: accepted (JAX places the model). A training
    workdir is taken as its final/ checkpoint, with its tokenizer. A mistake ends in one line, status 2."""
    import shutil

    ckpt, _ = tiny_qwen_vocab_checkpoint
    workdir = tmp_path / "run"
    shutil.copytree(ckpt, workdir / "final")
    for name in os.listdir(qwen_tokenizer_dir):
        shutil.copy(os.path.join(qwen_tokenizer_dir, name), workdir / "final")
    lm = JetNemoLM(str(workdir), device="cuda:0", dtype="float32")
    assert lm.tok_encode("Hello world") and lm.eot_token_id is not None
    with pytest.raises(SystemExit) as e:
        main(["run", "--model", "jetnemo", "--model_args", f"checkpoint={tmp_path / 'missing'}", "--tasks",
              "jetnemo_tiny_mc", "--include_path", os.path.join(REPO, "tests/eval/data")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: checkpoint=") and "Traceback" not in "".join(err)

"""train.py as a user meets it: a mistake is one line on stderr and exit status 2, nothing half-written."""

import pytest

from tests.train.runs import ROOT, run_train, small_flags


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_bad_inputs_end_in_one_line_naming_the_problem(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    cases = [
        ({"train.stpes": 10}, ["'train.stpes'", "did you mean 'train.steps'", "valid keys under train"]),
        ({"data.global_batch": 0}, ["data.global_batch=0", "positive"]),
        ({"data.source": str(tmp_path / "nowhere/*.jsonl"), "data.tokenizer": str(tmp_path)}, ["nowhere"]),
        ({"data.source": str(empty), "data.tokenizer": str(tmp_path)}, ["empty.txt"]),
        ({"data.tokenizer": str(tmp_path / "no_tokenizer")}, ["no_tokenizer", "no such directory"]),
        ({"trian.steps": 10}, ["unknown config key 'trian'", "did you mean 'train'"]),  # a misspelt section
        ({}, ["workdir=", "cannot create the run's directory", "File exists"]),  # the workdir is a file
    ]
    for i, (overrides, words) in enumerate(cases):
        workdir = tmp_path / f"run{i}"
        if not overrides:
            workdir.write_text("a file where the workdir should go")
        out = run_train(small_flags(workdir, **overrides), JAX_PLATFORMS="cpu")
        lines = _error_lines(out.stderr)
        assert out.returncode == 2, (overrides, out.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: "), (overrides, out.stderr[-2000:])
        assert all(w in lines[0] for w in words), (words, lines[0])
        assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())
        assert not (workdir / "final").exists()


def test_a_missing_config_file_and_verbose(tmp_path):
    import subprocess
    import sys

    from tests.train.runs import env

    missing = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(tmp_path / "nope.py")],
                             env=env(JAX_PLATFORMS="cpu"), capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert missing.returncode == 2 and _error_lines(missing.stderr) == [
        f"error: --config: cannot load the config file ([Errno 2] No such file or directory: "
        f"'{tmp_path / 'nope.py'}')"], missing.stderr
    # With the default config file the overrides apply as the flag is defined; PostNAS shares the parser.
    for module, key in ((["train.py"], "train.stpes"), (["-m", "jetnemo_jax.nas"], "supernet.stepz")):
        cmd = [sys.executable, *(str(ROOT / m) if m.endswith(".py") else m for m in module), f"--config.{key}=1"]
        out = subprocess.run(cmd, env=env(JAX_PLATFORMS="cpu"), capture_output=True, text=True, cwd=ROOT, timeout=300)
        lines = _error_lines(out.stderr)
        assert out.returncode == 2 and len(lines) == 1 and f"unknown config key '{key}'" in lines[0], out.stderr
    verbose = run_train(small_flags(tmp_path / "v", **{"data.global_batch": -1}) + ["--verbose"],
                        JAX_PLATFORMS="cpu")
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr and "data.global_batch" in verbose.stderr


@pytest.mark.parametrize("flag", ["--help", "--print_config"])
def test_help_says_how_to_list_the_keys_and_print_config_lists_them(tmp_path, flag):
    import subprocess
    import sys

    from tests.train.runs import env

    out = subprocess.run([sys.executable, str(ROOT / "train.py"), flag], env=env(JAX_PLATFORMS="cpu"),
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if flag == "--help":
        assert "--print_config" in out.stdout
    else:
        for key in ("global_batch: 8", "eval_every: 100", "allow_changes: ''", "remat: none"):
            assert key in out.stdout, key

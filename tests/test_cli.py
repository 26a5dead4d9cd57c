"""The command line: user errors are one clear message and exit code 2, never a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from conftest import tone
from larcq_ray.cli import main, user_message
from larcq_ray.core.errors import LarcqError


def run_cli(capsys, *argv):
    rc = main(list(argv))
    err = capsys.readouterr().err
    return rc, err


@pytest.fixture
def bench(tmp_path):
    b = tmp_path / "bench"
    (b / "audios").mkdir(parents=True)
    sf.write(b / "audios" / "a.wav", tone(2.0, 48000), 48000)
    (b / "queries.csv").write_text("audio_id,query,split_1\na.wav,a tone,a tone\n")
    return b


def cfg_file(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_config_key(capsys, tmp_path):
    rc, err = run_cli(capsys, "index", "--config", str(cfg_file(tmp_path, "index:\n  chunk_size: 3\n")))
    assert rc == 2 and "index.chunk_size: unknown key" in err and "Traceback" not in err


def test_bad_value_via_set(capsys, tmp_path):
    rc, err = run_cli(capsys, "search", "--config", str(cfg_file(tmp_path, "run_dir: r\n")),
                      "--set", "search.top_k=-3")
    assert rc == 2 and "search.top_k" in err


def test_missing_model(capsys, tmp_path, bench):
    c = cfg_file(tmp_path, f"run_dir: {tmp_path}/run\ndata:\n  benchmark: {bench}\n"
                           f"model:\n  name_or_path: {tmp_path}/no_model\n")
    rc, err = run_cli(capsys, "index", "--config", str(c))
    assert rc == 2 and "cannot load CLAP" in err and "no_model" in err


def test_queries_naming_missing_audio(capsys, tmp_path, bench):
    (bench / "queries.csv").write_text("audio_id,query\na.wav,x\nmissing.wav,y\n")
    c = cfg_file(tmp_path, f"run_dir: {tmp_path}/run\ndata:\n  benchmark: {bench}\n")
    rc, err = run_cli(capsys, "index", "--config", str(c))
    assert rc == 2 and "missing.wav" in err and "not in the corpus" in err


def test_malformed_queries_csv(capsys, tmp_path, bench):
    (bench / "queries.csv").write_text("audio,query\na.wav,x\n")
    c = cfg_file(tmp_path, f"run_dir: {tmp_path}/run\ndata:\n  benchmark: {bench}\n")
    rc, err = run_cli(capsys, "run", "--config", str(c))
    assert rc == 2 and "lacks column(s) ['audio_id']" in err


def test_search_and_evaluate_before_index(capsys, tmp_path, bench):
    c = cfg_file(tmp_path, f"run_dir: {tmp_path}/run\ndata:\n  benchmark: {bench}\n")
    rc, err = run_cli(capsys, "search", "--config", str(c))
    assert rc == 2 and "no index" in err
    rc, err = run_cli(capsys, "evaluate", "--config", str(c))
    assert rc == 2 and "no search results" in err


def test_wrapped_errors_are_unwrapped():
    class FakeRayTaskError(Exception):
        def __init__(self, cause):
            super().__init__("ray wrapper")
            self.cause = cause

    assert user_message(FakeRayTaskError(LarcqError("the real reason"))) == "the real reason"
    assert user_message(RuntimeError("x")) is None


def test_console_script_prints_one_line_not_a_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "larcq_ray.cli", "index", "--config", str(tmp_path / "nope.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("larcq-ray index: error: config file not found")
    assert "Traceback" not in out.stderr


def test_job_entrypoints_exist_and_run_the_cli(capsys, monkeypatch):
    """Every `python -m jobs.<name>` (what `ray job submit` runs) is the CLI's `larcq-ray <command>`:
    its --help is that command's help (jobs.train_clap -> train-clap)."""
    import os
    import pkgutil
    import runpy

    import jobs

    root = Path(__file__).resolve().parent.parent
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps help to the terminal width: the same everywhere
    modules = sorted(m.name for m in pkgutil.iter_modules(jobs.__path__) if not m.ispkg)
    assert {"index", "search", "evaluate", "run", "benchmark", "train_clap"} <= set(modules), modules
    helps = {}
    for name in modules:
        command = name.replace("_", "-")
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        helps[name] = capsys.readouterr().out
        assert helps[name].startswith(f"usage: larcq-ray {command} ") and "--config" in helps[name]
        monkeypatch.setattr(sys, "argv", [str(root / "jobs" / f"{name}.py"), "--help"])
        with pytest.raises(SystemExit) as done:
            runpy.run_module(f"jobs.{name}", run_name="__main__")
        assert done.value.code == 0, name
        assert capsys.readouterr().out == helps[name], f"python -m jobs.{name} is not `larcq-ray {command}`"
    # One real process, as a Ray job runs it.
    out = subprocess.run([sys.executable, "-m", "jobs.train_clap", "--help"], cwd=root, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "COLUMNS": "100"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == helps["train_clap"]

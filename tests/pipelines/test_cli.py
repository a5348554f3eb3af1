"""The entry points' shared contract: bad input (UserError) exits 2 with one line, any other
failure exits 1 with its traceback; HYDRA_FULL_ERROR=1 shows bad input's traceback too."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def guarded_exit(exception: str, env: dict | None = None) -> subprocess.CompletedProcess:
    code = ("from lzn.errors import UserError\nfrom pipelines.cli import guarded\n"
            f"def fail():\n    raise {exception}('the value 7 is not one of [1, 2]')\n"
            "guarded(fail)\n")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | (env or {})
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)


def test_bad_input_exits_2_with_one_line():
    done = guarded_exit("UserError")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: the value 7 is not one of [1, 2]"]


@pytest.mark.parametrize("exception", ["ValueError", "RuntimeError"])
def test_any_other_failure_exits_1_with_its_traceback(exception):
    done = guarded_exit(exception)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr and f"{exception}: the value 7" in done.stderr


def test_hydra_full_error_shows_the_traceback_of_bad_input():
    done = guarded_exit("UserError", {"HYDRA_FULL_ERROR": "1"})
    assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr


def test_an_entry_point_refuses_a_bad_value_with_exit_2(tmp_path):
    env = {**os.environ, "LZN_DATA_DIR": str(tmp_path / "data"), "LZN_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run([sys.executable, "-m", "pipelines.train", "task=gen_digits", "train.iterations=0",
                           f"output_dir={tmp_path}", "tracking.enabled=false"], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: train.iterations must be > 0, got 0" in done.stderr and "Traceback" not in done.stderr

"""The evaluation stage on Ray workers (a real Ray head): the FID of the same samples does
not depend on how many workers made them."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_ray_train import ROOT, environment

EVAL = ["task=gen_digits", "scale=smoke", "tracking.enabled=false", "eval.fid_samples=48", "eval.chunk_size=8"]


def run(module: str, *overrides, out: Path, head) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", module, f"output_dir={out}", *overrides], cwd=ROOT,
                          capture_output=True, text=True, env=environment(out, head), timeout=600)
    if done.returncode != 0:
        raise AssertionError(f"{module} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def evaluation(done) -> Path:
    return Path(done.stdout.strip().splitlines()[-1].removeprefix("evaluation folder: "))


def test_fid_is_the_same_with_one_and_two_ray_workers(ray_head, tmp_path):
    run("pipelines.train", "task=gen_digits", "scale=smoke", "tracking.enabled=false", out=tmp_path, head=None)
    checkpoint = f"checkpoint={tmp_path}/gen_digits/smoke-seed0"
    results, workers = {}, {}
    for backend, n in (("local", 1), ("ray", 1), ("ray", 2)):
        shutil.rmtree(tmp_path / "gen_digits" / "smoke-seed0" / "eval", ignore_errors=True)
        shutil.rmtree(tmp_path / "data" / "digits" / "fid_stats", ignore_errors=True)  # the reference too
        done = run("pipelines.evaluate", *EVAL, checkpoint, f"backend={backend}", f"trainer.num_workers={n}",
                   out=tmp_path, head=ray_head if backend == "ray" else None)
        folder = evaluation(done)
        results[backend, n] = json.loads((folder / "metrics.json").read_text())
        if backend == "ray":
            workers[n] = {w["pid"] for w in json.loads((folder / "parts" / "workers.json").read_text()).values()}
    assert len(workers[1]) == 1 and len(workers[2]) == 2  # 2 worker processes shared the shards
    base = results["local", 1]
    assert base["eval/fid_samples"] == 48 and base["eval/fid_reference_samples"] == 1257
    for key, result in results.items():
        assert result["eval/fid"] == pytest.approx(base["eval/fid"], rel=1e-9, abs=1e-9), key
        assert result["eval/reconstruction_l2"] == pytest.approx(base["eval/reconstruction_l2"], rel=1e-9), key

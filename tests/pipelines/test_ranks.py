"""`pipelines.run` under torchrun (2 CPU ranks, Gloo): the stage DAG on every rank of one
process group (pipelines.ranks), as the tasks of a Slurm job with slurm.launcher=ddp run it."""
import json
import os
import subprocess
import sys
from pathlib import Path

from orchestration.folder import RunFolder
from tests.pipelines.test_run import SMOKE, stages
from tests.pipelines.test_train import ROOT
from tests.ports import free_port


def torchrun(*overrides, out: Path, timeout: float = 600):
    env = {**os.environ, "LZN_DATA_DIR": str(out / "data"), "LZN_CACHE_DIR": str(out / "cache"),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m"]
    return subprocess.run([*launcher, "pipelines.run", f"output_dir={out}", *SMOKE, "train.batch_size=16", *overrides],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)


def check(done):
    if done.returncode != 0:
        raise AssertionError(f"torchrun pipelines.run failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-3000:]}")
    return done


def test_every_rank_runs_the_dag_trains_and_evaluates_sharded_and_a_rerun_skips_every_stage(tmp_path):
    run_dir = tmp_path / "gen_digits" / "smoke-seed0"
    first = check(torchrun(out=tmp_path))
    assert stages(first) == {"prepare": "ran", "train": "ran", "evaluate": "ran", "report": "ran"}
    assert first.stdout.count("stages: ") == 1  # rank 0 tells the results
    folder = RunFolder(run_dir)
    workers = [json.loads(folder.worker_record(r).read_text()) for r in (0, 1)]  # both ranks trained
    assert [(w["rank"], w["world"]) for w in workers] == [(0, 2), (1, 2)] and workers[0]["pid"] != workers[1]["pid"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/steps"] == 4 and metrics["eval/fid"] > 0
    ranks_json = next(run_dir.glob("eval/step-4-*/parts/ranks.json"))  # the evaluate stage's own folder
    assert set(json.loads(ranks_json.read_text()).values()) == {0, 1}
    assert "| eval/fid |" in (run_dir / "report.md").read_text()
    records = sorted(p.stem for p in folder.pipeline.glob("*.json"))
    assert records == ["evaluate", "prepare", "report", "train"]

    again = check(torchrun(out=tmp_path))
    assert stages(again) == {s: "skipped" for s in ("prepare", "train", "evaluate", "report")}
    assert again.stderr.count("up to date, skipped") == 4  # rank 0 says it, once a stage
    log = [json.loads(line)["step"] for line in (run_dir / "train_metrics.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]  # nothing trained again


def test_a_prepare_failing_on_rank_0_ends_every_rank_with_its_message(tmp_path):
    missing = tmp_path / "no-such-images"
    done = torchrun("data.source=imagefolder", f"data.root={missing}", "tracking.enabled=false", out=tmp_path,
                    timeout=180)  # the other rank waits at a barrier: a hang would time out here
    assert done.returncode != 0
    said = done.stderr.count(f"data.root {str(missing)!r} does not exist")
    assert said >= 2, done.stderr[-3000:]  # rank 0's own error, and rank 1's report of it
    assert "stage 'prepare' failed on rank 0" in done.stderr
    assert not (tmp_path / "gen_digits" / "smoke-seed0" / "pipeline").exists() or \
        not list((tmp_path / "gen_digits" / "smoke-seed0" / "pipeline").glob("*.json"))

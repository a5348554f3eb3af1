"""`pipelines.run` under torchrun (2 CPU ranks, Gloo): the stage DAG on every rank of one
process group (pipelines.ranks), as the tasks of a Slurm job with slurm.launcher=ddp run it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from lzn.errors import UserError
from orchestration.folder import RunFolder
from pipelines.ranks import OtherRankFailed, process_group
from tests.pipelines.test_run import SMOKE, stages
from tests.pipelines.test_train import ROOT
from tests.ports import free_port


def torchrun(*overrides, out: Path, timeout: float = 600):
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # this checkout's code
    env = {**os.environ, "LZN_DATA_DIR": str(out / "data"), "LZN_CACHE_DIR": str(out / "cache"),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
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
    assert first.stderr.count("shard(s) written") == 1  # prepared by rank 0 alone
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


def _calls(rank: int, port: int, out: Path) -> None:
    """One of 2 ranks: what each call of Ranks does with the other rank's answer."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    seen: dict = {}
    with process_group(torch.device("cpu")) as ranks:
        seen["rank"] = [ranks.rank, ranks.world, ranks.lead]
        seen["same"] = ranks.agree("a setting", lambda: "x")
        try:  # a run folder each rank sees differently
            ranks.agree("whether stage 'train' is up to date", lambda: rank == 0)
        except RuntimeError as e:
            seen["disagree"] = str(e)
        try:
            ranks.on_lead("preparing", lambda: 1 / 0)
        except (ZeroDivisionError, OtherRankFailed) as e:
            seen["lead"] = [type(e).__name__, str(e)]
        try:
            ranks.settle("training", UserError("no such file") if rank == 1 else None)
        except UserError as e:
            seen["user"] = str(e)
        seen["on_lead"] = ranks.on_lead("reporting", lambda: "done")
    seen["destroyed"] = not torch.distributed.is_initialized()
    (out / f"{rank}.json").write_text(json.dumps(seen))


def test_ranks_agree_or_fail_together_and_a_failure_on_one_reaches_every_rank(tmp_path):
    mp.start_processes(_calls, args=(free_port(), tmp_path), nprocs=2, start_method="spawn")
    zero, one = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert zero["rank"] == [0, 2, True] and one["rank"] == [1, 2, False]
    assert zero["same"] == one["same"] == "x"
    for seen in (zero, one):  # rank 0 saw it up to date, rank 1 not: refused on both, naming both
        assert "disagree on whether stage 'train' is up to date: rank 0: True, rank 1: False" in seen["disagree"]
    assert zero["lead"] == ["ZeroDivisionError", "division by zero"]  # its own error, as it is
    assert one["lead"] == ["OtherRankFailed", "preparing failed on rank 0: ZeroDivisionError: division by zero"]
    assert zero["user"] == "training failed on rank 1: UserError: no such file" and one["user"] == "no such file"
    assert zero["on_lead"] == "done" and one["on_lead"] is None  # run on rank 0 alone
    assert zero["destroyed"] and one["destroyed"]

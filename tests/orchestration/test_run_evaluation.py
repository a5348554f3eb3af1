"""train_and_evaluate on two gloo ranks: both compute parts of the evaluation at every
checkpoint (a sweep's metric, through the checkpoint store every rank has) and at the end,
and rank 0 reports the numbers. The Ray Train and torchrun runs of tests/integration and
tests/pipelines check the same records end to end."""
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir

from lzn.checkpoint import FolderCheckpoints
from lzn.data.prepare import PrepareConfig, prepare_dataset
from orchestration.folder import RunFolder
from orchestration.reporting import REPORT_INDEX, tune_key
from orchestration.run import train_and_evaluate
from pipelines.config import register, to_run_config
from tests.ports import free_port

CONF = Path(__file__).resolve().parents[2] / "pipelines" / "conf"
WORLD = 2

register()


class EveryRankReports(FolderCheckpoints):
    """A checkpoint store with the contract of Ray Train's (orchestration.ray.train.RayCheckpoints):
    every rank calls `report_metrics` at each save, rank 0 keeps what it returns."""

    def __init__(self, folder, keep):
        super().__init__(folder, keep)
        self.report_metrics, self.reports = None, []

    def save(self, state, step, rank):
        self.reports.append(self.report_metrics(step))
        return super().save(state, step, rank)


def _worker(rank, port, cfg, run_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        store = EveryRankReports(RunFolder(run_dir).checkpoints, cfg.train.keep_checkpoints)
        metrics = train_and_evaluate(cfg, run_dir, device=torch.device("cpu"), checkpoints=store,
                                     report_metric="eval/fid", progress=False)
        Path(run_dir, f"rank{rank}.json").write_text(json.dumps({"metrics": metrics, "reports": store.reports}))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(900)
def test_every_rank_evaluates_at_each_checkpoint_and_at_the_end(tmp_path):
    prepare_dataset("digits", None, tmp_path / "data" / "digits", PrepareConfig(executor="serial"), progress=False)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        # Shards of one inference batch (8 samples): 2 FID sample units, so both ranks get one
        # even once the reference statistics are cached.
        cfg = to_run_config(compose("config", overrides=[
            "task=gen_digits", "scale=smoke", f"output_dir={tmp_path}", "eval.chunk_size=8"]))
    cfg.data.shards_dir = str(tmp_path / "data")
    run_dir = tmp_path / "run"
    mp.start_processes(_worker, args=(free_port(), cfg, str(run_dir)), nprocs=WORLD, join=True,
                       start_method="spawn")
    rank0, rank1 = (json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(WORLD))
    folder = RunFolder(run_dir)

    steps = [2, 4]  # smoke: 4 steps, a checkpoint every 2
    for step in steps:  # a sweep's metric at each checkpoint
        ranks = json.loads(folder.checkpoint_evaluation(step).part_ranks.read_text())
        assert set(ranks.values()) == {0, 1} and any(u.startswith("samples") for u in ranks), ranks
        assert not list(folder.checkpoint_evaluation(step).parts.glob("*.pt"))  # reduced: the parts are gone
    assert [r[REPORT_INDEX] for r in rank0["reports"]] == [1, 2] and rank1["reports"] == [None, None]
    logged = [json.loads(line) for line in folder.checkpoint_metrics.read_text().splitlines()]
    assert [row["step"] for row in logged] == steps

    final = json.loads(folder.final_evaluation(4).part_ranks.read_text())
    assert set(final.values()) == {0, 1}
    assert any(u.startswith("reconstruct") for u in final)  # the whole evaluation, not the sweep's metric
    assert "eval/fid" in rank0["metrics"] and "eval/fid" not in rank1["metrics"]  # rank 1: the train summary
    assert folder.read_metrics()["eval/fid"] == rank0["metrics"]["eval/fid"]
    # The last checkpoint's report and the final evaluation evaluate the same EMA model with the
    # same FID units: the same number.
    assert logged[-1]["eval/fid"] == rank0["reports"][-1][tune_key("eval/fid")] == rank0["metrics"]["eval/fid"]

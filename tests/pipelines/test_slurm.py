"""What a Slurm job of `make slurm` runs, composed here without a cluster (the job itself runs
against a real Slurm in tests/integration/test_slurm.py and test_multinode_slurm.py)."""
import sys

from pipelines import slurm
from pipelines.config import PipelineRun


def test_a_training_job_on_ray_runs_the_stage_dag_and_the_launcher_picks_its_backend_last():
    command = slurm.job_command("train", ["task=gen_digits", "backend=local"], "ray")
    assert command == [sys.executable, "-m", "pipelines.run", "task=gen_digits", "backend=local", "backend=ray"]


def test_ddp_tasks_run_the_stage_dag_on_the_local_backend_each_task_a_rank():
    command = slurm.job_command("train", ["task=gen_digits", "backend=ray"], "ddp")
    assert command == [sys.executable, "-m", "pipelines.run", "task=gen_digits", "backend=ray", "backend=local"]


def test_a_sweep_job_runs_the_sweep():
    assert slurm.job_command("sweep", ["task=gen_digits"], "ray")[1:3] == ["-m", "pipelines.sweep"]


def test_the_dag_config_is_checked_before_submission_with_its_stages_and_run_folder(tmp_path):
    cfg, run_dir = slurm.pipeline_config("train", ["task=gen_digits", "scale=smoke", f"output_dir={tmp_path}",
                                                   "stages=[prepare,train]"])
    assert isinstance(cfg, PipelineRun) and cfg.stages == ["prepare", "train"]
    assert run_dir == (tmp_path / "gen_digits" / "smoke-seed0").resolve()  # the folder `make train` uses

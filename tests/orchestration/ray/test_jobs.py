"""Ray Jobs' upload holds the project: its working_dir is the repository root."""
from pathlib import Path

from orchestration.ray import jobs as ray_jobs

ROOT = Path(__file__).resolve().parents[3]


def test_the_job_uploads_the_project_root():
    assert ray_jobs.PROJECT_ROOT == ROOT
    assert (ray_jobs.PROJECT_ROOT / "pyproject.toml").is_file() and (ray_jobs.PROJECT_ROOT / "pipelines").is_dir()

"""Running `lzn` on engines: Ray Train workers, Ray Tune sweeps, submitit/Slurm jobs,
Ray Jobs submission, and MLflow tracking behind the small logging interface that `lzn`
reports to. Imports `lzn`, ray, mlflow and submitit; never Hydra (configs arrive here as
the typed dataclasses that `lzn` defines). Its modules arrive with the Ray Train, sweep
and Slurm issues.
"""

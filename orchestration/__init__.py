"""Running `lzn` on engines: one training run on one rank for every launcher
(`training`), the Ray Train backend (`ray_train`), MLflow tracking with a local server
(`tracking`, `mlflow_server`), run plots (`artifacts`) and the data stage on Ray (`data`);
Ray Tune sweeps, submitit/Slurm and Ray Jobs arrive with their issues. Imports `lzn`, ray,
mlflow and submitit; never Hydra (configs arrive here as the typed dataclasses that `lzn`
and this package define).
"""

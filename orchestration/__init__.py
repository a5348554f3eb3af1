"""Running `lzn` on engines. What one run is lives at the top: `run` (the run schema, its
metadata, `train_and_evaluate`: one run on one rank for every launcher), `folder` (the run
folder's layout), `reporting` (what a run reports to its scheduler) and `plots`. One
subpackage per engine sits on them: `mlflow` (tracking, the local server, the pending file),
`ray` (cluster start-up, Train, Tune sweeps, Data, evaluation actors, Jobs) and `slurm`
(settings and preflight, submission, the job inside the allocation). Imports `lzn`, ray,
mlflow and submitit; never Hydra (configs arrive here as typed dataclasses).
"""

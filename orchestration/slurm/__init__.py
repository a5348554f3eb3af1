"""Slurm through submitit: the `slurm:` settings and their checks (`settings`), preflight and
submission (`submit`), and the job that runs inside the allocation (`job`)."""

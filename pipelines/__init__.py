"""The commands the Makefile calls (`python -m pipelines.<verb> task=... key=value ...`): one
module per entry point, what they share in `cli` (the error guard, exit codes, run metadata)
and `config` (every command's schema in Hydra's ConfigStore), the stages they run in
`stages/` and the stage DAG in `dag`. The only layer that imports Hydra; it may import
everything else; no entry point imports another.
"""

"""The stage DAG (prepare data -> train -> evaluate -> report), the Hydra task configs in
`pipelines/conf/`, and the entry points the Makefile calls (`python -m pipelines.<verb>
task=... key=value ...`). The only layer that imports Hydra; it may import everything
else. Its modules arrive with the case-study and data issues.
"""

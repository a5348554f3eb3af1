"""The pipeline's stages as functions: prepare the data, train, evaluate a checkpoint, write
the report. The entry points (`python -m pipelines.<verb>`) and the stage DAG
(`pipelines.run`) call them; no entry point imports another."""

"""What a person looks at: the MLflow UI on the project's tracking store (`ui`, `make ui`) and
self-contained HTML sweep reports built from MLflow (`report`, `make report`). Reads MLflow
only, never `lzn` internals.
"""

"""What a person looks at: the MLflow UI on the project's tracking store (`make ui`) and
self-contained HTML sweep reports built from MLflow (`make report`). Reads MLflow only,
never `lzn` internals. Its modules arrive with the dashboards issue.
"""

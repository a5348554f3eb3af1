"""Datasets: the digits split that ships with scikit-learn (and, with the data stage,
Parquet shards of every dataset)."""

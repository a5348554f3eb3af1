"""MLflow tracking: the rank-0 tracker (`tracker`), a local server (`server`), what the server
has not taken yet (`pending`) and which MLflow run a run folder continues (`runs`)."""

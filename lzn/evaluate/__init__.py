"""The evaluation of a trained task, as shards of work that any number of workers can share.

Which metrics apply to which objective:

| objective | metrics |
| --- | --- |
| generation | fid, reconstruction |
| rf | fid |
| representation, simclr | linear_probe |
| joint | classification, conditional (digits_cnn features only), fid |

An evaluation is a list of `Unit`s (a kind and a range of samples or rows) and a reduction.
A unit is a pure function of the model, the data and its range: generated images are
seeded by their global batch index (`LZNModel.generate(first_batch=)`) and units start on
inference-batch boundaries, so LZN's batch-dependent latents are those of the whole set.
`Evaluator.run(unit)` computes a part (feature moments, features, counts), `PartStore`
keeps it as a file, and `reduce` merges the parts once, in unit order: the FID of N samples
is the same whether 1 or 4 workers made them. Parts already on disk are not recomputed, so
an interrupted evaluation resumes. Keys follow metrics.json: eval/fid,
eval/linear_probe_top1, ...; the inference batch size and alpha that LZN's latents depend
on are recorded beside them.

Each metric is one file of this package (`fid`, `linear_probe`, `classification`,
`conditional`, `reconstruction`): a `core.Metric` that says how it plans its units for a
task and its data, what a unit of each of its kinds computes, and how the parts reduce to
its keys, and that registers itself (`core.register`) when the file is imported below. The
machinery in `core` (`plan`, `evaluate`, `Evaluator.run`, `select_metrics`,
`metric_for_key`) reaches the metrics only through that registry (`METRICS`), so a new
metric is a new file and its name in the import below.

Where the units run is the caller's `execute`: this process (`evaluate_here`), every rank of
a torch.distributed process group (`ranks.evaluate_on_ranks`, the end of a multi-rank
training run), or Ray actors (`orchestration.ray.evaluate`).
"""
from lzn.evaluate.core import (
    DEFAULT_CHUNK,
    METRICS,
    Evaluator,
    Job,
    Metric,
    PartStore,
    Parts,
    Unit,
    applicable_metrics,
    chunk_size,
    evaluate,
    evaluate_here,
    execute_here,
    fid_extractor,
    load_model,
    metric_for_key,
    plan,
    register,
    select_metrics,
    units_of,
)

# Each registers its metric as it is imported: this order is that of METRICS, so of the planned units.
from lzn.evaluate import fid, linear_probe, classification, conditional, reconstruction
from lzn.evaluate.fid import fid_labels, fid_samples
from lzn.evaluate.linear_probe import train_probe
from lzn.evaluate.ranks import assign, evaluate_on_ranks
from lzn.evaluate.reconstruction import (
    MAX_DRAWS,
    RECONSTRUCTION_SEED,
    reconstruction_rows,
    reconstruction_samples,
    reconstruction_units,
)

__all__ = [
    "DEFAULT_CHUNK",
    "MAX_DRAWS",
    "METRICS",
    "RECONSTRUCTION_SEED",
    "Evaluator",
    "Job",
    "Metric",
    "PartStore",
    "Parts",
    "Unit",
    "applicable_metrics",
    "assign",
    "chunk_size",
    "classification",
    "conditional",
    "evaluate",
    "evaluate_here",
    "evaluate_on_ranks",
    "execute_here",
    "fid",
    "fid_extractor",
    "fid_labels",
    "fid_samples",
    "linear_probe",
    "load_model",
    "metric_for_key",
    "plan",
    "reconstruction",
    "reconstruction_rows",
    "reconstruction_samples",
    "reconstruction_units",
    "register",
    "select_metrics",
    "train_probe",
    "units_of",
]

"""What every metric shares: the `Unit`s of work and the `PartStore` that keeps their parts,
the `Evaluator` that computes a part on a worker, the `Job` a metric plans and reduces on
the driver, and the registry (`METRICS`, `register`) through which `plan`, `evaluate` and
`Evaluator.run` reach the metrics without naming any of them."""
from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import torch
from torch import nn

from lzn import metrics
from lzn.atomic import write_atomically
from lzn.checkpoint import load_checkpoint
from lzn.errors import UserError
from lzn.eval_data import EvalData
from lzn.inference import LZNModel

DEFAULT_CHUNK = 10_000  # samples per unit (rounded up to whole inference batches)
T = TypeVar("T")


# ----------------------------------------------------------------------------- the work
@dataclass(frozen=True)
class Unit:
    """One shard of an evaluation: `kind` (one of a registered metric's `kinds`) over samples
    or rows [lo, hi)."""

    kind: str
    index: int
    lo: int
    hi: int

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.index:05d}"


def chunk_size(cfg) -> int:
    """Samples per unit: eval.chunk_size rounded up to whole inference batches."""
    bs = cfg.eval.batch_size
    chunk = max(cfg.eval.chunk_size or DEFAULT_CHUNK, bs)
    return -(-chunk // bs) * bs


def units_of(kind: str, total: int, chunk: int) -> list[Unit]:
    return [Unit(kind, i, lo, min(lo + chunk, total)) for i, lo in enumerate(range(0, total, chunk))]


class PartStore:
    """One file per unit in `folder`, written atomically by whichever worker computed it."""

    SUFFIX = ".pt"  # of a part's file; the folder may hold other records (which worker computed what)

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, unit: Unit) -> Path:
        return self.folder / f"{unit.name}{self.SUFFIX}"

    def has(self, unit: Unit) -> bool:
        return self.path(unit).is_file()

    def save(self, unit: Unit, part: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path(unit), lambda f: torch.save({"unit": asdict(unit), "part": part}, f))

    def load(self, unit: Unit) -> dict:
        try:
            saved = torch.load(self.path(unit), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises several types for a broken file
            raise UserError(f"evaluation part {self.path(unit)} is unreadable ({type(err).__name__}): delete it "
                            "and run the evaluation again to recompute it") from None
        if saved.get("unit") != asdict(unit):
            raise UserError(f"{self.path(unit)} holds unit {saved.get('unit')}, not {asdict(unit)}: "
                            "delete the parts folder to recompute it")
        return saved["part"]

    def clear(self) -> None:
        """Remove every part in the folder; its other records stay."""
        for path in self.folder.glob(f"*{self.SUFFIX}"):
            path.unlink(missing_ok=True)


class Parts:
    """The stored parts of an evaluation's units, by kind, in unit order (the order they merge)."""

    def __init__(self, store: PartStore, units: list[Unit]):
        self.store, self._units = store, units

    def units(self, kind: str) -> list[Unit]:
        return [u for u in self._units if u.kind == kind]

    def load(self, kind: str) -> list[dict]:
        return [self.store.load(u) for u in self.units(kind)]

    def ratio(self, kind: str, key: str) -> float:
        """sum(part[key]) / sum(part["count"]) over the parts of `kind`: a mean over all their rows."""
        parts = self.load(kind)
        return sum(p[key] for p in parts) / sum(p["count"] for p in parts)


class Once:
    """Things built on first use and kept for the object's life: `once(build)` is build(self)."""

    def once(self, build: Callable[[Any], T]) -> T:
        built = self.__dict__.setdefault("_built", {})
        if build not in built:
            built[build] = build(self)
        return built[build]


# ------------------------------------------------------------------------ the metrics
Execute = Callable[[list[Unit]], None]  # computes the parts of the given units into the store
Probe = Callable[[PartStore, list[Unit], list[Unit]], dict]  # trains the probe on the stored features


@dataclass
class Job(Once):
    """One evaluation on the driver, as its metrics plan and reduce it: the task and its data,
    and what the caller of `evaluate` lends the reductions: the FID extractor (called only
    when a metric needs it; None: no cached statistics are looked up), the linear probe's
    trainer (None: `train_probe` on `device`), the device the reductions run on and whether
    they may draw bars (the probe's; False: none). `once` keeps what a metric's plan and
    reduction share (the FID reference cache)."""

    cfg: Any
    data: EvalData
    extractor: Callable[[], nn.Module] | None = None
    probe: Probe | None = None
    device: Any = "cpu"
    progress: bool = True

    @property
    def chunk(self) -> int:
        return chunk_size(self.cfg)


class Metric(ABC):
    """A metric, as its file in lzn/evaluate/ declares it and `register`s it: the units it
    plans for a task and its data, the part `Evaluator.run` computes for a unit of each of its
    `kinds`, and the reduction of those parts, in unit order, to metrics.json keys. `plan` and
    `reduce` run once, on the driver; `run` on any worker, a pure function of the model, the
    data and the unit, so the numbers do not depend on how many workers share the units."""

    name: str  # what metrics=[...] selects
    objectives: tuple[str, ...]  # the objectives it applies to
    kinds: tuple[str, ...]  # of its units
    keys: tuple[str, ...]  # the metrics.json keys that a sweep may optimise (`metric_for_key`)

    def applies(self, cfg) -> bool:
        return cfg.objective in self.objectives

    def check_key(self, cfg, key: str) -> None:
        """Refuse (UserError) one of `keys` that task `cfg` does not report as configured."""

    @abstractmethod
    def plan(self, job: Job) -> list[Unit]: ...

    @abstractmethod
    def run(self, evaluator: Evaluator, unit: Unit) -> dict: ...

    @abstractmethod
    def reduce(self, job: Job, parts: Parts) -> dict[str, float | str]: ...


METRICS: dict[str, Metric] = {}  # name -> metric, in registration order: that of planning and reducing


def register(cls: type[Metric]) -> type[Metric]:
    """Class decorator: a metric's file makes its metric known by name."""
    metric = cls()
    taken = sorted({k for m in METRICS.values() for k in m.kinds} & set(metric.kinds))
    if metric.name in METRICS or taken:
        raise ValueError(f"metric {metric.name!r} is registered already, or unit kinds {taken} are another's")
    METRICS[metric.name] = metric
    return cls


def in_order(chosen: Iterable[str]) -> list[str]:
    chosen = set(chosen)
    return [m for m in METRICS if m in chosen]


def metric_for_key(cfg, key: str) -> str:
    """The metric that produces metrics.json key `key` for task `cfg`, checked against its objective."""
    owner = {k: m for m in METRICS.values() for k in m.keys}
    if key not in owner:
        raise UserError(f"{key!r} is not an evaluation metric; expected one of {sorted(owner)}")
    if key.endswith("_euler10") and not cfg.eval.fid_euler10:
        raise UserError(f"{key!r} needs eval.fid_euler10=true (task {cfg.name!r} has it off)")
    owner[key].check_key(cfg, key)
    return select_metrics(cfg, [owner[key].name])[0]


def applicable_metrics(cfg) -> list[str]:
    """The metrics task `cfg` (lzn.task.TaskConfig) can be evaluated on, in METRICS order."""
    return [name for name, m in METRICS.items() if m.applies(cfg)]


def select_metrics(cfg, requested: Iterable[str] | None) -> list[str]:
    """`requested` checked against what the objective has (None: all of them)."""
    have = applicable_metrics(cfg)
    if requested is None:
        return have
    requested = list(requested)
    unknown = [m for m in requested if m not in METRICS]
    if unknown:
        raise UserError(f"metrics={unknown} are not known; expected some of {list(METRICS)}")
    missing = [m for m in requested if m not in have]
    if missing:
        raise UserError(f"metrics={missing} do not apply to objective {cfg.objective!r} "
                        f"(eval.fid_features={cfg.eval.fid_features}); it has {have}")
    if not requested:
        raise UserError(f"metrics=[] selects nothing; objective {cfg.objective!r} has {have}")
    return in_order(requested)


# --------------------------------------------------------------------------- a worker
def fid_extractor(name: str, cache_dir: Path, weights: str | None = None) -> nn.Module:
    if name == "digits_cnn":
        return metrics.digits_cnn_extractor(cache_dir)
    if name == "inception":
        return metrics.inception_extractor(weights)
    if name == "pixels":
        from lzn.metrics.pixel_features import pixel_extractor

        return pixel_extractor()
    raise UserError(f"unknown FID feature extractor {name!r}; expected digits_cnn, inception or pixels")


def sampling(cfg) -> dict:
    """The `LZNModel.generate` settings of the evaluation: solver, steps, inference batch, seed."""
    ev = cfg.eval
    return dict(method=ev.sampler, steps=ev.sampler_steps, batch_size=ev.batch_size, seed=ev.seed)


class Evaluator(Once):
    """Computes the part of one unit on this process, with the metric whose kind it is: the
    model, the data and (lazily) the feature extractor, and through `once` whatever else a
    metric builds for its units (the digits classifier), on `model.device`."""

    def __init__(self, cfg, model: LZNModel, data: EvalData, *, cache_dir: str | Path):
        self.cfg, self.model, self.data, self.cache_dir = cfg, model, data, Path(cache_dir)

    @property
    def extractor(self) -> nn.Module:
        return self.once(_extractor)

    def run(self, unit: Unit) -> dict:
        for metric in METRICS.values():
            if unit.kind in metric.kinds:
                return metric.run(self, unit)
        raise ValueError(f"unknown evaluation unit kind {unit.kind!r}")


def _extractor(evaluator: Evaluator) -> nn.Module:
    ev = evaluator.cfg.eval
    return fid_extractor(ev.fid_features, evaluator.cache_dir, ev.inception_weights).to(evaluator.model.device)


# ----------------------------------------------------------------------- an evaluation
def plan(job: Job, chosen: Iterable[str]) -> list[Unit]:
    """Every unit of an evaluation of `chosen` metrics, in the order their parts merge."""
    return [u for name in in_order(chosen) for u in METRICS[name].plan(job)]


def evaluate(cfg, *, chosen: list[str], data: EvalData, store: PartStore, execute: Execute,
             extractor: Callable[[], nn.Module], probe: Probe | None = None,
             device="cpu", progress: bool = True) -> dict[str, float | str]:
    """Run (or resume) the evaluation of `chosen` metrics and reduce it to metrics.json keys.

    execute: computes the parts of a list of units into `store` (in this process, or on Ray
    workers); units whose part exists are not passed again. extractor: the FID extractor
    (called only when FID is chosen and its reference statistics are needed). probe: trains
    the linear probe on the stored features (default: `train_probe` here, on `device`).
    device: where KID and precision/recall run on the subsets' features (distances of 10k x
    10k rows). progress: False keeps the reductions' bars (the default probe's) off.
    """
    job = Job(cfg, data, extractor, probe, device, progress)
    units = plan(job, chosen)
    todo = [u for u in units if not store.has(u)]
    if todo:
        execute(todo)
    parts, ev, out = Parts(store, units), cfg.eval, {}
    for name in in_order(chosen):
        out.update(METRICS[name].reduce(job, parts))
    out["eval/inference_batch_size"] = float(ev.batch_size)
    if cfg.objective not in ("rf", "simclr"):
        out["eval/alpha"] = float(cfg.latent.alpha if ev.alpha is None else ev.alpha)
    return out


def execute_here(evaluator: Evaluator, store: PartStore, *, progress: bool | Callable = True) -> Execute:
    """Compute units one after another in this process. progress: True a tqdm bar on this
    process's terminal, False none, or a tqdm-like class to draw it with."""
    from tqdm.auto import tqdm

    make_bar = progress if callable(progress) else tqdm

    def run(units: list[Unit]) -> None:
        for unit in make_bar(units, desc="evaluate", unit="shard", disable=not progress or len(units) < 2,
                             file=sys.stderr):
            store.save(unit, evaluator.run(unit))

    return run


def evaluate_here(cfg, model: LZNModel, data: EvalData, *, cache_dir: str | Path, parts_dir: str | Path,
                  chosen: list[str] | None = None, progress: bool | Callable = True) -> dict[str, float | str]:
    """The whole evaluation in this process (the end of a training run, or backend=local)."""
    evaluator, store = Evaluator(cfg, model, data, cache_dir=cache_dir), PartStore(parts_dir)
    return evaluate(cfg, chosen=select_metrics(cfg, chosen), data=data, store=store,
                    execute=execute_here(evaluator, store, progress=progress),
                    extractor=lambda: evaluator.extractor, device=model.device,
                    progress=bool(progress))  # a tqdm-like class draws the shards' bar; the probe keeps tqdm


def load_model(cfg, checkpoint: str | Path, device) -> tuple[LZNModel, int]:
    """The EMA model of a training checkpoint and the step it was saved at."""
    from lzn.task import build_objective

    state = load_checkpoint(Path(checkpoint), map_location="cpu")
    objective = build_objective(cfg)
    try:
        objective.load_state_dict(state["ema"])
    except RuntimeError as err:
        raise UserError(f"checkpoint {checkpoint} does not fit task {cfg.name!r} as configured "
                        f"(objective={cfg.objective}, model={cfg.model.encoder}/{cfg.model.decoder}, "
                        f"latent.dim={cfg.latent.dim}): {str(err).splitlines()[0]}") from None
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    return LZNModel(objective, shape, device), int(state["step"])

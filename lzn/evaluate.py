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
an interrupted evaluation resumes.

The real set's FID statistics are computed once per dataset, image size and extractor and
cached next to the shards (`ReferenceCache`, keyed by the manifest's checksum and the
extractor's weights). Keys follow metrics.json: eval/fid, eval/linear_probe_top1, ...;
the inference batch size and alpha that LZN's latents depend on are recorded beside them.

"fid" is every metric of the generated set, from one extractor pass per image
(`lzn.metrics.image_set`): eval/fid, eval/is (and eval/is_std), eval/kid (eval/kid_std),
eval/precision, eval/recall, and with eval.fid_euler10 the same of an Euler 10-step set
(eval/fid_euler10, ...), as the paper logs beside RK45. KID and precision/recall read a
fixed seeded subset of eval.kid_pr_samples rows of each set; the reference's subset
features are cached with its moments. With the digits CNN (fid_features=digits_cnn) the
same metrics are computed in its feature space, and the Inception Score from its 10 digit
logits: a digits IS (at most 10), not comparable with Inception IS (at most 1008), but the
same definition and still "confident and diverse" classes of generated digits.

"reconstruction" is eval/reconstruction_l2 on a seeded random subset of the training split
(`reconstruction_rows`: shards keep the source's order, class-sorted for image folders, so
the first rows could be one class), and with eval.fid_euler10 eval/reconstruction_l2_euler10
of the same images and latent draws with Euler in 10 steps, as the reference runs its
metric for each evaluation sampler.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from lzn import metrics
from lzn.atomic import write_atomically
from lzn.checkpoint import load_checkpoint
from lzn.eval_data import EvalData
from lzn.inference import LZNModel, balanced_labels
from lzn.metrics.fid import has_logits
from lzn.metrics.image_set import ImageSetPart, feature_subset
from lzn.reference_cache import ReferenceCache

METRICS = ("fid", "linear_probe", "classification", "conditional", "reconstruction")
DEFAULT_CHUNK = 10_000  # samples per unit (rounded up to whole inference batches)
MAX_DRAWS = 1000  # reconstruction draws per image: draw d of seed s uses latent seed s * MAX_DRAWS + d
RECONSTRUCTION_SEED = 0  # of the reconstructed subset: the reference's StatefulSampler(seed=0)


# metrics.json key -> the metric that computes it
IMAGE_SET_KEYS = ("fid", "is", "kid", "precision", "recall")  # eval/<name> and eval/<name>_euler10
METRIC_OF_KEY = {"eval/linear_probe_top1": "linear_probe", "eval/linear_probe_top5": "linear_probe",
                 "eval/classification_accuracy": "classification", "eval/conditional_accuracy": "conditional",
                 "eval/reconstruction_l2": "reconstruction", "eval/reconstruction_l2_euler10": "reconstruction",
                 **{f"eval/{k}{s}": "fid" for k in IMAGE_SET_KEYS for s in ("", "_euler10")}}


def metric_for_key(cfg, key: str) -> str:
    """The metric that produces metrics.json key `key` for task `cfg`, checked against its objective."""
    if key not in METRIC_OF_KEY:
        raise ValueError(f"{key!r} is not an evaluation metric; expected one of {sorted(METRIC_OF_KEY)}")
    if key.endswith("_euler10") and not cfg.eval.fid_euler10:
        raise ValueError(f"{key!r} needs eval.fid_euler10=true (task {cfg.name!r} has it off)")
    if key.split("/")[1].split("_")[0] in ("kid", "precision", "recall") and cfg.eval.kid_pr_samples < 1:
        raise ValueError(f"{key!r} needs eval.kid_pr_samples > 0, got {cfg.eval.kid_pr_samples}")
    return select_metrics(cfg, [METRIC_OF_KEY[key]])[0]


def applicable_metrics(cfg) -> list[str]:
    """The metrics task `cfg` (lzn.task.TaskConfig) can be evaluated on, in METRICS order."""
    out = {"representation": ["linear_probe"], "simclr": ["linear_probe"], "rf": ["fid"],
           "generation": ["fid", "reconstruction"], "joint": ["classification", "fid"]}[cfg.objective]
    if cfg.objective == "joint" and cfg.eval.fid_features == "digits_cnn":
        out.append("conditional")  # class consistency needs a classifier of the dataset: the digits CNN
    return [m for m in METRICS if m in out]


def select_metrics(cfg, requested: Iterable[str] | None) -> list[str]:
    """`requested` checked against what the objective has (None: all of them)."""
    have = applicable_metrics(cfg)
    if requested is None:
        return have
    requested = list(requested)
    unknown = [m for m in requested if m not in METRICS]
    if unknown:
        raise ValueError(f"metrics={unknown} are not known; expected some of {list(METRICS)}")
    missing = [m for m in requested if m not in have]
    if missing:
        raise ValueError(f"metrics={missing} do not apply to objective {cfg.objective!r} "
                         f"(eval.fid_features={cfg.eval.fid_features}); it has {have}")
    if not requested:
        raise ValueError(f"metrics=[] selects nothing; objective {cfg.objective!r} has {have}")
    return [m for m in METRICS if m in requested]


# ----------------------------------------------------------------------------- the work
@dataclass(frozen=True)
class Unit:
    """One shard of an evaluation: `kind` over samples or rows [lo, hi)."""

    kind: str  # reference | samples | samples_euler10 | probe_train | probe_test | classify | conditional
    #            | reconstruct | reconstruct_euler10
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


def fid_samples(cfg, data: EvalData) -> int:
    return cfg.eval.fid_samples or data.size("train")


def reconstruction_samples(cfg, data: EvalData) -> int:
    """How many training images are reconstructed: eval.reconstruction_samples (0: all)."""
    n, have = cfg.eval.reconstruction_samples, data.size("train")
    if n < 0 or not 1 <= cfg.eval.reconstruction_draws <= MAX_DRAWS:
        raise ValueError(f"eval.reconstruction_samples must be >= 0 and eval.reconstruction_draws in [1, {MAX_DRAWS}], "
                         f"got {n} and {cfg.eval.reconstruction_draws}")
    return min(n, have) if n else have


def reconstruction_rows(cfg, data: EvalData) -> Tensor:
    """The training rows reconstructed, (n,) int64: the first n of the permutation
    torch.randperm(size, generator seeded RECONSTRUCTION_SEED), in that order: the rows and
    order of the batch the reference's StatefulSampler(seed=0) gives one process
    (lzn/data/sampler.py, epoch 0; its world_size processes share the first ~n of it)."""
    generator = torch.Generator().manual_seed(RECONSTRUCTION_SEED)
    return torch.randperm(data.size("train"), generator=generator)[:reconstruction_samples(cfg, data)]


def reconstruction_units(cfg, data: EvalData, chunk: int) -> list[Unit]:
    """Draw d of subset positions [lo, hi) (of `reconstruction_rows`) is the unit over
    [d n + lo, d n + hi) of the draws x rows; with eval.fid_euler10 the same units again, of
    kind reconstruct_euler10."""
    n, units = reconstruction_samples(cfg, data), []
    for kind in ("reconstruct", "reconstruct_euler10") if cfg.eval.fid_euler10 else ("reconstruct",):
        ranges = [(d * n + lo, d * n + min(lo + chunk, n))
                  for d in range(cfg.eval.reconstruction_draws) for lo in range(0, n, chunk)]
        units += [Unit(kind, i, lo, hi) for i, (lo, hi) in enumerate(ranges)]
    return units


def plan(cfg, chosen: list[str], data: EvalData, *, reference_cached: bool) -> list[Unit]:
    """Every unit of an evaluation of `chosen` metrics, in the order their parts merge."""
    chunk, units = chunk_size(cfg), []
    if "fid" in chosen:
        if not reference_cached:
            units += units_of("reference", data.size("train"), chunk)
        units += units_of("samples", fid_samples(cfg, data), chunk)
        if cfg.eval.fid_euler10:
            units += units_of("samples_euler10", fid_samples(cfg, data), chunk)
    if "linear_probe" in chosen:
        units += units_of("probe_train", data.size("train"), chunk) + units_of("probe_test", data.size("test"), chunk)
    if "classification" in chosen:
        units += units_of("classify", data.size("test"), chunk)
    if "conditional" in chosen:
        units += units_of("conditional", cfg.data.num_classes * cfg.eval.per_class, chunk)
    if "reconstruction" in chosen:
        units += reconstruction_units(cfg, data, chunk)
    return units


def fid_extractor(name: str, cache_dir: Path, weights: str | None = None) -> nn.Module:
    if name == "digits_cnn":
        return metrics.digits_cnn_extractor(cache_dir)
    if name == "inception":
        return metrics.inception_extractor(weights)
    raise ValueError(f"unknown FID feature extractor {name!r}; expected digits_cnn or inception")


def fid_labels(cfg, n: int) -> Tensor | None:
    """The class of every FID sample of a joint model: exactly balanced (`balanced_labels`:
    sample i has class i % num_classes, so each class has n // num_classes samples and the
    first n % num_classes classes one more), as class-conditional FID is measured."""
    if cfg.objective != "joint":
        return None
    return balanced_labels(n, cfg.data.num_classes)


class Evaluator:
    """Computes the part of one unit on this process: the model, the data and (lazily) the
    feature extractor and classifier it needs, on `model.device`."""

    def __init__(self, cfg, model: LZNModel, data: EvalData, *, cache_dir: str | Path):
        self.cfg, self.model, self.data, self.cache_dir = cfg, model, data, Path(cache_dir)
        self._extractor, self._classifier, self._reconstruction_rows = None, None, None

    @property
    def extractor(self) -> nn.Module:
        if self._extractor is None:
            ev = self.cfg.eval
            self._extractor = fid_extractor(ev.fid_features, self.cache_dir, ev.inception_weights).to(self.model.device)
        return self._extractor

    def _image_set(self, images: Tensor, unit: Unit, total: int, *, inception_score: bool) -> dict:
        """The `ImageSetPart` of rows [unit.lo, unit.hi) of a set of `total`, as a state dict."""
        ev = self.cfg.eval
        part = metrics.image_set_part(images, self.extractor, lo=unit.lo, total=total,
                                      subset=feature_subset(total, ev.kid_pr_samples), inception_score=inception_score,
                                      is_splits=ev.is_splits, batch_size=ev.batch_size)
        return part.state_dict()

    def _sample(self) -> dict:
        ev = self.cfg.eval
        return dict(method=ev.sampler, steps=ev.sampler_steps, batch_size=ev.batch_size, seed=ev.seed)

    def run(self, unit: Unit) -> dict:
        ev, model, n = self.cfg.eval, self.model, unit.hi - unit.lo
        first, bs = unit.lo // ev.batch_size, ev.batch_size
        if unit.kind == "reference":
            images, _ = self.data.rows("train", unit.lo, unit.hi)
            return self._image_set(images, unit, self.data.size("train"), inception_score=False)
        if unit.kind in ("samples", "samples_euler10"):
            labels = fid_labels(self.cfg, unit.hi)
            sample = self._sample() if unit.kind == "samples" else {**self._sample(), "method": "euler", "steps": 10}
            # The Euler set has the samples' seeds: the same noise and latents, another solver.
            fake = model.generate(n, None if labels is None else labels[unit.lo:], first_batch=first, **sample)
            return self._image_set(fake, unit, fid_samples(self.cfg, self.data),
                                   inception_score=has_logits(self.extractor))
        if unit.kind in ("probe_train", "probe_test"):
            # Train and test images alike: Resize(probe_resize) + CenterCrop(image_size), as the
            # reference's evaluation transform (its probe's train loader, as released, would
            # feed two augmented views to the backbone and cannot run: lzn.metrics.probe).
            images, labels = self.data.rows(unit.kind.removeprefix("probe_"), unit.lo, unit.hi,
                                            resize=ev.probe_resize or None)
            return {"features": model.embed(images, batch_size=bs), "labels": labels}
        if unit.kind == "classify":
            images, labels = self.data.rows("test", unit.lo, unit.hi)
            pred = model.classify(images, batch_size=bs, alpha=ev.alpha, first_batch=first)
            return {"correct": int((pred == labels).sum()), "count": n}
        if unit.kind == "conditional":
            if self._classifier is None:
                self._classifier = metrics.load_digits_classifier(self.cache_dir).to(model.device)
            labels = torch.arange(self.cfg.data.num_classes).repeat(ev.per_class)[unit.lo:unit.hi]
            images = model.generate(n, labels, first_batch=first, **{**self._sample(), "seed": ev.seed + 1})
            pred = self._classifier(images.to(model.device)).argmax(dim=1).cpu()
            return {"correct": int((pred == labels).sum()), "count": n}
        if unit.kind in ("reconstruct", "reconstruct_euler10"):
            # As the reference (lzn/metric/reconstructions_with_computed_ini_noise.py): training
            # images, each draw a new latent noise (so a new latent in the image's zone), the
            # image ODE inverted from the image with that latent and integrated back; per image
            # the L2 norm over all pixels in [-1, 1], averaged over images and draws.
            if self._reconstruction_rows is None:
                self._reconstruction_rows = reconstruction_rows(self.cfg, self.data)
            rows = self._reconstruction_rows
            draw, lo = divmod(unit.lo, len(rows))
            images, _ = self.data.rows_at("train", rows[lo:lo + n])
            # The Euler set has the same images and draws (latent seeds): another solver only.
            method, steps = (ev.sampler, ev.sampler_steps) if unit.kind == "reconstruct" else ("euler", 10)
            recon = model.reconstruct(images, batch_size=bs, method=method, steps=steps,
                                      first_batch=lo // bs, alpha=ev.alpha, seed=ev.seed * MAX_DRAWS + draw)
            l2 = torch.linalg.vector_norm((recon.double() - images.double()).flatten(1), dim=1).sum()
            return {"l2_sum": float(l2), "count": n}
        raise ValueError(f"unknown evaluation unit kind {unit.kind!r}")


class PartStore:
    """One file per unit in `folder`, written atomically by whichever worker computed it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, unit: Unit) -> Path:
        return self.folder / f"{unit.name}.pt"

    def has(self, unit: Unit) -> bool:
        return self.path(unit).is_file()

    def save(self, unit: Unit, part: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path(unit), lambda f: torch.save({"unit": asdict(unit), "part": part}, f))

    def load(self, unit: Unit) -> dict:
        try:
            saved = torch.load(self.path(unit), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises several types for a broken file
            raise ValueError(f"evaluation part {self.path(unit)} is unreadable ({type(err).__name__}): delete it "
                             "and run the evaluation again to recompute it") from None
        if saved.get("unit") != asdict(unit):
            raise ValueError(f"{self.path(unit)} holds unit {saved.get('unit')}, not {asdict(unit)}: "
                             "delete the parts folder to recompute it")
        return saved["part"]


# -------------------------------------------------------------------------- the reduction
Execute = Callable[[list[Unit]], None]  # computes the parts of the given units into the store
Probe = Callable[[PartStore, list[Unit], list[Unit]], dict]  # trains the probe on the stored features


def train_probe(cfg, store: PartStore, train_units: list[Unit], test_units: list[Unit], device="cpu") -> dict:
    """The linear probe on the stored features (one process: the probe is small)."""
    def gather(units):
        parts = [store.load(u) for u in units]
        return torch.cat([p["features"] for p in parts]).to(device), torch.cat([p["labels"] for p in parts]).to(device)

    ev = cfg.eval
    (xtr, ytr), (xte, yte) = gather(train_units), gather(test_units)
    return metrics.linear_probe(xtr, ytr, xte, yte, epochs=ev.probe_epochs, lr=ev.probe_lr, seed=ev.seed,
                                batch_size=ev.probe_batch_size, standardize=ev.probe_standardize)


def evaluate(cfg, *, chosen: list[str], data: EvalData, store: PartStore, execute: Execute,
             extractor: Callable[[], nn.Module], probe: Probe | None = None,
             device="cpu") -> dict[str, float | str]:
    """Run (or resume) the evaluation of `chosen` metrics and reduce it to metrics.json keys.

    execute: computes the parts of a list of units into `store` (in this process, or on Ray
    workers); units whose part exists are not passed again. extractor: the FID extractor
    (called only when FID is chosen and its reference statistics are needed). probe: trains
    the linear probe on the stored features (default: `train_probe` here). device: where
    KID and precision/recall run on the subsets' features (distances of 10k x 10k rows).
    """
    ev, out = cfg.eval, {}
    reference = None
    cache = None
    if "fid" in chosen and data.dataset_dir is not None:
        cache = ReferenceCache(data.dataset_dir, extractor(), image_size=cfg.data.image_size,
                               channels=cfg.data.channels, subset=ev.kid_pr_samples)
        reference = cache.load()
    units = plan(cfg, chosen, data, reference_cached=reference is not None)
    todo = [u for u in units if not store.has(u)]
    if todo:
        execute(todo)

    def of(kind):
        return [u for u in units if u.kind == kind]

    def image_set(kind) -> ImageSetPart:
        return ImageSetPart.merge_all(ImageSetPart.from_state_dict(store.load(u)) for u in of(kind))

    def ratio(kind, key) -> float:
        parts = [store.load(u) for u in of(kind)]
        return sum(p[key] for p in parts) / sum(p["count"] for p in parts)

    if "linear_probe" in chosen:
        result = (probe or (lambda s, a, b: train_probe(cfg, s, a, b)))(store, of("probe_train"), of("probe_test"))
        out["eval/linear_probe_top1"], out["eval/linear_probe_top5"] = result["top1"], result["top5"]
    if "classification" in chosen:
        out["eval/classification_accuracy"] = ratio("classify", "correct")
    if "conditional" in chosen:
        out["eval/conditional_accuracy"] = ratio("conditional", "correct")
    if "fid" in chosen:
        if reference is None:
            reference = image_set("reference")
            if cache is not None:
                cache.save(reference)
        for kind, suffix in (("samples", ""), ("samples_euler10", "_euler10")):
            if of(kind):
                found = metrics.compare(reference, image_set(kind), device=device)
                out.update({f"eval/{k}{suffix}": v for k, v in found.items() if k != "kid_subset_size"})
                if "kid_subset_size" in found:
                    out["eval/kid_subset_size"] = found["kid_subset_size"]
        out["eval/fid_features"] = ev.fid_features
        out["eval/fid_samples"] = float(fid_samples(cfg, data))
        out["eval/fid_reference_samples"] = float(reference.moments.num_samples)
    if "reconstruction" in chosen:
        out["eval/reconstruction_l2"] = ratio("reconstruct", "l2_sum")
        if of("reconstruct_euler10"):
            out["eval/reconstruction_l2_euler10"] = ratio("reconstruct_euler10", "l2_sum")
    out["eval/inference_batch_size"] = float(ev.batch_size)
    if cfg.objective not in ("rf", "simclr"):
        out["eval/alpha"] = float(cfg.latent.alpha if ev.alpha is None else ev.alpha)
    return out


def execute_here(evaluator: Evaluator, store: PartStore, *, progress: bool = True) -> Execute:
    """Compute units one after another in this process."""
    from tqdm.auto import tqdm

    def run(units: list[Unit]) -> None:
        for unit in tqdm(units, desc="evaluate", unit="shard", disable=not progress or len(units) < 2,
                         file=sys.stderr):
            store.save(unit, evaluator.run(unit))

    return run


def evaluate_here(cfg, model: LZNModel, data: EvalData, *, cache_dir: str | Path, parts_dir: str | Path,
                  chosen: list[str] | None = None, progress: bool = True) -> dict[str, float | str]:
    """The whole evaluation in this process (the end of a training run, or backend=local)."""
    evaluator, store = Evaluator(cfg, model, data, cache_dir=cache_dir), PartStore(parts_dir)
    return evaluate(cfg, chosen=select_metrics(cfg, chosen), data=data, store=store,
                    execute=execute_here(evaluator, store, progress=progress),
                    extractor=lambda: evaluator.extractor,
                    probe=lambda s, a, b: train_probe(cfg, s, a, b, device=model.device), device=model.device)


def load_model(cfg, checkpoint: str | Path, device) -> tuple[LZNModel, int]:
    """The EMA model of a training checkpoint and the step it was saved at."""
    from lzn.task import build_objective

    state = load_checkpoint(Path(checkpoint), map_location="cpu")
    objective = build_objective(cfg)
    try:
        objective.load_state_dict(state["ema"])
    except RuntimeError as err:
        raise ValueError(f"checkpoint {checkpoint} does not fit task {cfg.name!r} as configured "
                         f"(objective={cfg.objective}, model={cfg.model.encoder}/{cfg.model.decoder}, "
                         f"latent.dim={cfg.latent.dim}): {str(err).splitlines()[0]}") from None
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    return LZNModel(objective, shape, device), int(state["step"])

"""reconstruction: eval/reconstruction_l2 on a seeded random subset of the training split
(`reconstruction_rows`: shards keep the source's order, class-sorted for image folders, so
the first rows could be one class), and with eval.fid_euler10 eval/reconstruction_l2_euler10
of the same images and latent draws with Euler in 10 steps, as the reference runs its
metric for each evaluation sampler."""
from __future__ import annotations

import torch
from torch import Tensor

from lzn import seeds
from lzn.errors import UserError
from lzn.eval_data import EvalData
from lzn.evaluate.core import Evaluator, Job, Metric, Parts, Unit, register

MAX_DRAWS = seeds.RECONSTRUCTION_DRAWS  # reconstruction draws per image (lzn.seeds.reconstruction_draw)
RECONSTRUCTION_SEED = 0  # of the reconstructed subset: the reference's StatefulSampler(seed=0)


def reconstruction_samples(cfg, data: EvalData) -> int:
    """How many training images are reconstructed: eval.reconstruction_samples (0: all)."""
    n, have = cfg.eval.reconstruction_samples, data.size("train")
    if n < 0 or not 1 <= cfg.eval.reconstruction_draws <= MAX_DRAWS:
        raise UserError(f"eval.reconstruction_samples must be >= 0 and eval.reconstruction_draws in [1, {MAX_DRAWS}], "
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


def rows_of(evaluator: Evaluator) -> Tensor:
    return reconstruction_rows(evaluator.cfg, evaluator.data)


@register
class Reconstruction(Metric):
    name = "reconstruction"
    objectives = ("generation",)
    kinds = ("reconstruct", "reconstruct_euler10")
    keys = ("eval/reconstruction_l2", "eval/reconstruction_l2_euler10")

    def plan(self, job: Job) -> list[Unit]:
        return reconstruction_units(job.cfg, job.data, job.chunk)

    def run(self, evaluator: Evaluator, unit: Unit) -> dict:
        # As the reference (lzn/metric/reconstructions_with_computed_ini_noise.py): training
        # images, each draw a new latent noise (so a new latent in the image's zone), the
        # image ODE inverted from the image with that latent and integrated back; per image
        # the L2 norm over all pixels in [-1, 1], averaged over images and draws.
        ev, n = evaluator.cfg.eval, unit.hi - unit.lo
        bs = ev.batch_size
        rows = evaluator.once(rows_of)
        draw, lo = divmod(unit.lo, len(rows))
        images, _ = evaluator.data.rows_at("train", rows[lo:lo + n])
        # The Euler set has the same images and draws (latent seeds): another solver only.
        method, steps = (ev.sampler, ev.sampler_steps) if unit.kind == "reconstruct" else ("euler", 10)
        recon = evaluator.model.reconstruct(images, batch_size=bs, method=method, steps=steps, first_batch=lo // bs,
                                            alpha=ev.alpha, seed=seeds.reconstruction_draw(ev.seed, draw))
        l2 = torch.linalg.vector_norm((recon.double() - images.double()).flatten(1), dim=1).sum()
        return {"l2_sum": float(l2), "count": n}

    def reduce(self, job: Job, parts: Parts) -> dict[str, float | str]:
        out = {"eval/reconstruction_l2": parts.ratio("reconstruct", "l2_sum")}
        if parts.units("reconstruct_euler10"):
            out["eval/reconstruction_l2_euler10"] = parts.ratio("reconstruct_euler10", "l2_sum")
        return out

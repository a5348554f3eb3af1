"""The one training loop for every LZN case study.

The loop owns stepping, per-module learning rates with linear warm-up, gradient clipping,
EMA, non-finite-loss skipping, checkpoints and resume, and reporting. An objective
supplies `loss(batch) -> (loss, metrics)`; the loop knows nothing of which case study it
runs, nor of MLflow or Ray: it reports to callbacks. Rank and world size come from the
torch.distributed process group that torchrun, Ray Train or submitit set up; gradients
are averaged across ranks by bucketed all-reduces that overlap backward
(`lzn.distributed.GradientBuckets`; the anchors' all-gather already summed the cross-rank
terms onto their owners).

A step never waits on the device: metrics are summed on the device and reach the host at
`log_every`; a non-finite loss (on any rank) or gradient skips the step on the device (the
flag rides the gradient all-reduce, fused Adam's `found_inf` skips the update, the EMA's
weight is zeroed); the zoning value checks are off during steps (`lzn.zoning.check_values`).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lzn import distributed as lzn_dist
from lzn import seeds, zoning
from lzn.checkpoint import CHECKPOINT_DIR, CheckpointStore, FolderCheckpoints, rng_state, set_rng_state
from lzn.errors import UserError
from lzn.roles import Role, role_field


@dataclass
class OptimConfig:
    lr: dict[str, float] = field(default_factory=dict)  # learning rate per module group
    warmup: int = 5000  # linear warm-up iterations, then constant
    grad_clip: float = 1.0
    ema_decay: float = 0.9999


@dataclass
class TrainConfig:
    iterations: int = role_field(Role.LENGTH, default=1000)
    batch_size: int = 256  # global batch, split evenly over the workers
    seed: int = 0
    checkpoint_every: int = role_field(Role.RUNTIME, default=1000)
    keep_checkpoints: int = role_field(Role.RUNTIME, default=3)
    log_every: int = role_field(Role.RUNTIME, default=50)
    bf16: bool = False
    deterministic: bool = False
    # Module group -> iteration from which it is frozen, its EMA too (joint case study: the decoder).
    freeze_after: dict[str, int] = field(default_factory=dict)
    progress: bool = role_field(Role.RUNTIME, default=True)


class Callback(Protocol):
    """Rank 0's reporting hooks; before_checkpoint and on_checkpoint are optional."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None: ...
    def before_checkpoint(self, step: int) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...


def ema_decay(decay: float, updates: int) -> float:
    """The paper's EMA warm-up: min(decay, (1 + k) / (10 + k)) after k updates."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


def _fused_adam(groups: list[dict]) -> torch.optim.Adam:
    """Adam with fused=True, whose kernel skips a step where `optimizer.found_inf` (a device
    tensor) is 1 without reading it on the host. A checkpoint's saved param_groups (e.g. one
    written before fused was used) replace the live ones on load: a post-hook restores
    fused, and moves each "step" count where the fused kernel wants it (float32, on the
    parameter's device)."""
    optimizer = torch.optim.Adam(groups, fused=True)

    def refuse(opt: torch.optim.Optimizer) -> None:
        for group in opt.param_groups:
            group.update(fused=True, foreach=None, capturable=False, differentiable=False)
            for q in group["params"]:
                state = opt.state.get(q, {})
                if "step" in state:
                    state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(q.device)

    optimizer.register_load_state_dict_post_hook(refuse)
    return optimizer


class _MetricWindow:
    """Sums of the finite values of each metric, and their counts, since the last report.

    Tensor metrics are summed on their device (a step queues a few kernels and reads
    nothing back); Python numbers on the host.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.index: dict[str, int] = {}  # tensor metric -> row of sums/counts
        self.sums = torch.zeros(0, dtype=torch.float64, device=device)
        self.counts = torch.zeros(0, dtype=torch.float64, device=device)
        self.host: dict[str, list[float]] = {}  # Python-number metric -> [sum, count]
        self._missing = torch.full((), math.nan, dtype=torch.float64, device=device)

    def add(self, metrics: dict[str, Tensor | float]) -> None:
        tensors = {}
        for k, v in metrics.items():
            if isinstance(v, Tensor):
                tensors[k] = v
            else:
                value, acc = float(v), self.host.setdefault(k, [0.0, 0.0])
                if math.isfinite(value):
                    acc[0], acc[1] = acc[0] + value, acc[1] + 1
        new = [k for k in tensors if k not in self.index]
        if new:
            self.index.update({k: len(self.index) + i for i, k in enumerate(new)})
            self.sums = torch.cat([self.sums, self.sums.new_zeros(len(new))])
            self.counts = torch.cat([self.counts, self.counts.new_zeros(len(new))])
        if not tensors:
            return
        # A key this step lacks counts as a non-finite value: nothing is added for it.
        values = torch.stack([tensors[k].detach().reshape(()).to(self.device, torch.float64)
                              if k in tensors else self._missing for k in self.index])
        finite = torch.isfinite(values)
        self.sums.add_(torch.where(finite, values, 0.0))
        self.counts.add_(finite)

    def keys(self) -> list[str]:
        return sorted(set(self.index) | set(self.host))


class Trainer:
    def __init__(
        self,
        objective: nn.Module,
        optim: OptimConfig,
        train: TrainConfig,
        batches: Callable[[int], dict],
        *,
        run_dir: str | Path,
        callbacks: list[Callback] | tuple = (),
        device: torch.device | str = "cpu",
        checkpoints: CheckpointStore | None = None,
        progress: bool | Callable = True,
    ):
        self.objective, self.optim_cfg, self.cfg = objective, optim, train
        self.batches = batches
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / CHECKPOINT_DIR
        # Ray Train hands checkpoints to its own storage; torchrun and plain runs use a folder.
        self.checkpoints = checkpoints or FolderCheckpoints(self.ckpt_dir, train.keep_checkpoints)
        self.callbacks = list(callbacks)
        # Rank 0's bar, with train.progress: True tqdm on this process's terminal, False none,
        # or a tqdm-like class to draw it with (a Ray worker's, which the Ray driver draws).
        self.progress = progress
        self.device = torch.device(device)
        self.rank, self.world = lzn_dist.rank(), lzn_dist.world_size()
        groups = dict(objective.named_children())
        unknown = sorted(set(optim.lr) - set(groups))
        missing = sorted(n for n, m in groups.items() if n not in optim.lr and any(True for _ in m.parameters()))
        if unknown or missing:
            raise UserError(
                f"optim.lr must give one learning rate per module group {sorted(groups)}: "
                f"unknown {unknown}, missing {missing}"
            )
        bad_freeze = sorted(set(train.freeze_after) - set(groups))
        if bad_freeze:
            raise UserError(f"train.freeze_after names unknown module groups {bad_freeze}; known: {sorted(groups)}")
        self.groups = groups
        self.optimizer = _fused_adam(
            [{"params": list(m.parameters()), "lr": optim.lr[n], "name": n}
             for n, m in groups.items() if n in optim.lr]
        )
        warmup = max(1, optim.warmup)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda k: min(1.0, (k + 1) / warmup)
        )
        if self.world > 1:
            # Every rank starts from rank 0's weights, as DDP does at construction.
            with torch.no_grad():
                for t in [*objective.parameters(), *objective.buffers()]:
                    dist.broadcast(t.data, src=0)
        self.ema = copy.deepcopy(objective).requires_grad_(False)
        self.step = 0
        self.last_checkpoint: Path | None = None  # rank 0: the newest checkpoint this trainer wrote
        # Device-side counters (read on the host at checkpoints and reports only).
        self._ema_updates = torch.zeros((), dtype=torch.float64, device=self.device)
        self._skipped = torch.zeros((), dtype=torch.int64, device=self.device)
        # What the trainable set decides, rebuilt when freeze_after changes it.
        self._trainable: tuple[nn.Parameter, ...] | None = None
        self._buckets: lzn_dist.GradientBuckets | None = None
        self._ema_pairs: tuple[list[Tensor], list[Tensor]] = ([], [])
        self.seconds = 0.0  # training wall time, checkpoints included
        self.checkpoint_seconds = 0.0

    # ------------------------------------------------------------------ state
    @property
    def ema_updates(self) -> int:
        return int(self._ema_updates)  # host sync: checkpoints and summaries only

    @ema_updates.setter
    def ema_updates(self, value: int) -> None:
        self._ema_updates.fill_(value)

    @property
    def skipped(self) -> int:
        return int(self._skipped)  # host sync: checkpoints and summaries only

    @skipped.setter
    def skipped(self, value: int) -> None:
        self._skipped.fill_(value)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "objective": self.objective.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema_updates": self.ema_updates,
            "skipped": self.skipped,
            "seconds": self.seconds,
            "checkpoint_seconds": self.checkpoint_seconds,
            "rng": self._gather_rng(),
            "world": self.world,
        }

    def _gather_rng(self) -> list[dict]:
        state = rng_state()
        if self.world == 1:
            return [state]
        out: list = [None] * self.world
        dist.all_gather_object(out, state)
        return out

    def load_state_dict(self, state: dict) -> None:
        self.objective.load_state_dict(state["objective"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.ema_updates = state["step"], state["ema_updates"]
        self.skipped, self.seconds = state["skipped"], state["seconds"]
        self.checkpoint_seconds = state.get("checkpoint_seconds", 0.0)
        rngs = state["rng"]
        # A run resumed on a different number of workers keeps the data order (it is a
        # function of the step) but re-seeds the per-rank RNGs it cannot map.
        if len(rngs) == self.world:
            set_rng_state(rngs[self.rank])
        else:
            torch.manual_seed(seeds.rank_rng_resumed(self.cfg.seed, self.step, self.rank))

    def resume(self) -> bool:
        """Load the latest checkpoint of this run, if any. Raises CheckpointError if corrupt."""
        state = self.checkpoints.latest(map_location=self.device)
        if state is None:
            return False
        self.load_state_dict(state)
        self.last_checkpoint = self.checkpoints.latest_path()
        return True

    def save(self) -> Path | None:
        state = self.state_dict()  # every rank joins the RNG gather
        if self.rank == 0:
            for cb in self.callbacks:  # e.g. deliver buffered metrics: the checkpoint must not pass them
                if hasattr(cb, "before_checkpoint"):
                    cb.before_checkpoint(self.step)
        path = self.checkpoints.save(state, self.step, self.rank)
        if self.rank != 0:
            return None
        self.last_checkpoint = path
        for cb in self.callbacks:
            if hasattr(cb, "on_checkpoint"):
                cb.on_checkpoint(self.step, path)
        return path

    # ------------------------------------------------------------------ one step
    def _frozen(self, name: str) -> bool:
        """Whether module group `name` is frozen at the current step (steps from 0: a group
        with freeze_after n trains for steps 0 .. n - 1, n optimizer updates)."""
        return self.step >= self.cfg.freeze_after.get(name, math.inf)

    def _apply_freezing(self) -> None:
        for name in self.cfg.freeze_after:
            frozen = self._frozen(name)
            for p in self.groups[name].parameters():
                p.requires_grad_(not frozen)
        trainable = tuple(p for p in self.objective.parameters() if p.requires_grad)
        if self._trainable is None or list(map(id, trainable)) != list(map(id, self._trainable)):
            self._retrain(trainable)

    def _retrain(self, trainable: tuple[nn.Parameter, ...]) -> None:
        """Rebuild what depends on the trainable set: the gradient buckets (every rank
        freezes at the same step, so every rank rebuilds at the same step) and the EMA's
        pairs of parameters (the groups not frozen)."""
        self._trainable = trainable
        find_unused = False  # whether a step has shown a parameter without a gradient
        if self._buckets is not None:
            self._buckets.close()
            find_unused, self._buckets = self._buckets.find_unused, None
        if self.world > 1:
            self._buckets = lzn_dist.GradientBuckets(trainable, device=self.device, find_unused=find_unused)
        ema_groups = dict(self.ema.named_children())
        pairs = [(e, p) for name, module in self.groups.items() if not self._frozen(name)
                 for e, p in zip(ema_groups[name].parameters(), module.parameters())]
        self._ema_pairs = ([e for e, _ in pairs], [p.detach() for _, p in pairs])

    @torch.no_grad()
    def _update_ema(self, keep: Tensor) -> None:
        """Move the EMA of every group that trained this step, unless the step was skipped
        (keep: 0-dim bool on the device). A frozen group keeps the average it had when it
        froze, as in the reference, whose EMA of a module updates only while the module is
        enabled (its decoder EMA stops with the decoder in case study 3); lerping it on
        would pull it towards the raw frozen weights. One update counter serves every group:
        a frozen group never updates again, so it counts the same as a counter of its own.

        ema += w (param - ema) with w = (1 - ema_decay) * keep, as three fused multi-tensor
        ops: `torch._foreach_lerp_` takes its weight as a host scalar, which a device weight
        would have to be read into."""
        k = self._ema_updates
        weight = (1.0 - torch.clamp((1.0 + k) / (10.0 + k), max=self.optim_cfg.ema_decay)) * keep
        emas, params = self._ema_pairs
        if emas:
            diffs = torch._foreach_sub(params, emas)
            torch._foreach_mul_(diffs, weight.to(emas[0].dtype))
            torch._foreach_add_(emas, diffs)
        for e, b in zip(self.ema.buffers(), self.objective.buffers()):
            e.copy_(torch.where(keep, b, e))
        self._ema_updates.add_(keep)

    def train_step(self) -> dict[str, Tensor | float]:
        """One optimizer step; returns this step's metrics as device tensors (no host sync)."""
        self._apply_freezing()
        batch = self.batches(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        if self._buckets is not None:
            self._buckets.zero_grad()
        with zoning.check_values(False), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                        enabled=self.cfg.bf16):
            loss, metrics = self.objective.loss(batch)
        bad = ~torch.isfinite(loss.detach())
        if self._buckets is not None:
            self._buckets.start(bad, loss)  # the flag rides the last gradient bucket
        loss.backward()  # also when non-finite: every rank joins the same collectives
        if self._buckets is not None:
            bad = self._buckets.finish()[0] > 0
        grad_norm = torch.nn.utils.clip_grad_norm_(self._trainable, self.optim_cfg.grad_clip)
        skip = bad | ~torch.isfinite(grad_norm)  # the reduced gradients agree on every rank
        self.optimizer.found_inf = skip.float()  # the fused kernel leaves params and moments alone
        self.optimizer.step()
        self._update_ema(~skip)
        self._skipped.add_(skip)
        self.scheduler.step()
        self.step += 1
        return {"loss": loss.detach(), **metrics,
                "train/grad_norm": torch.where(skip, math.nan, grad_norm.detach()),  # a skipped step has none
                "train/skipped": skip.float()}

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, float]:
        """Train to `iterations`, resuming from the latest checkpoint; returns a summary."""
        cfg = self.cfg
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        if not self.resume():
            torch.manual_seed(seeds.rank_rng(cfg.seed, self.rank))
        resumed_from = self.step
        bar = None
        if cfg.progress and self.progress and self.rank == 0 and self.step < cfg.iterations:
            from tqdm.auto import tqdm

            make_bar = self.progress if callable(self.progress) else tqdm
            bar = make_bar(total=cfg.iterations, initial=self.step, desc="train", unit="it", dynamic_ncols=True)
        window = _MetricWindow(self.device)
        start = time.perf_counter()
        while self.step < cfg.iterations:
            window.add(self.train_step())
            if bar is not None:
                bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.iterations:
                reported = self._report(window)
                window = _MetricWindow(self.device)
                if bar is not None and "loss" in reported:
                    bar.set_postfix(loss=f"{reported['loss']:.4f}")
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.iterations:
                self.seconds += time.perf_counter() - start
                start = time.perf_counter()
                self.save()
                self.checkpoint_seconds += time.perf_counter() - start
        self.seconds += time.perf_counter() - start
        if bar is not None:
            bar.close()
        return self._summary(resumed_from)

    def _summary(self, resumed_from: int) -> dict[str, float]:
        return {"train/steps": float(self.step), "train/skipped_steps": float(self.skipped),
                "train/seconds": self.seconds, "train/checkpoint_seconds": self.checkpoint_seconds,
                "train/resumed_from_step": float(resumed_from)}

    def _report(self, window: _MetricWindow) -> dict[str, float]:
        """Means since the last report over every rank's finite values, handed to the
        callbacks on rank 0 (and returned there; {} elsewhere). Every rank holds the same
        keys (a value non-finite on one rank only still has its key there), so the
        all-reduce lines up; a key with no finite value anywhere is not reported. The one
        host sync of the log interval: sums, counts and the skipped counter in one read."""
        on_device = [k for k in window.keys() if k in window.index]
        on_host = [k for k in window.keys() if k not in window.index]
        rows = torch.tensor([window.index[k] for k in on_device], dtype=torch.long, device=self.device)
        host = torch.tensor([window.host[k] for k in on_host], dtype=torch.float64).reshape(-1, 2).to(self.device)
        keys = on_device + on_host
        values = torch.cat([window.sums[rows], host[:, 0], window.counts[rows], host[:, 1],
                            self._skipped.to(torch.float64).reshape(1)])
        if self.world > 1:
            dist.all_reduce(values)
        values = values.tolist()  # host sync: once per log interval
        if self.rank != 0:
            return {}
        totals, counts = values[: len(keys)], values[len(keys) : 2 * len(keys)]
        metrics = {k: t / c for k, t, c in sorted(zip(keys, totals, counts)) if c > 0}
        metrics["train/skipped_steps"] = float(round(values[-1] / self.world))  # the same on every rank
        metrics["train/lr_scale"] = self.scheduler.get_last_lr()[0] / self.optimizer.param_groups[0]["initial_lr"]
        for cb in self.callbacks:
            if hasattr(cb, "on_log"):
                cb.on_log(self.step, metrics)
        return metrics

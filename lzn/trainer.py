"""The one training loop for every LZN case study.

The loop owns stepping, per-module learning rates with linear warm-up, gradient clipping,
EMA, non-finite-loss skipping, checkpoints and resume, and reporting. An objective
supplies `loss(batch) -> (loss, metrics)`; the loop knows nothing of which case study it
runs, nor of MLflow or Ray: it reports to callbacks. Rank and world size come from the
torch.distributed process group that torchrun, Ray Train or submitit set up; gradients
are averaged across ranks after backward (the anchors' all-gather already summed the
cross-rank terms onto their owners).
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
from lzn import seeds
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
        self.optimizer = torch.optim.Adam(
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
        self.ema_updates = 0
        self.skipped = 0
        self.seconds = 0.0  # training wall time, checkpoints included
        self.checkpoint_seconds = 0.0

    # ------------------------------------------------------------------ state
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

    def _average_gradients(self) -> None:
        if self.world == 1:
            return
        params = [p for p in self.objective.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p)
            offset += n

    def _any_rank(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    @torch.no_grad()
    def _update_ema(self) -> None:
        """Move the EMA of every group that trained this step. A frozen group keeps the average
        it had when it froze, as in the reference, whose EMA of a module updates only while the
        module is enabled (its decoder EMA stops with the decoder in case study 3); lerping it
        on would pull it towards the raw frozen weights. One update counter serves every group:
        a frozen group never updates again, so it counts the same as a counter of its own."""
        d = ema_decay(self.optim_cfg.ema_decay, self.ema_updates)
        ema_groups = dict(self.ema.named_children())
        for name, module in self.groups.items():
            if self._frozen(name):
                continue
            for e, p in zip(ema_groups[name].parameters(), module.parameters()):
                e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.ema.buffers(), self.objective.buffers()):
            e.copy_(b)
        self.ema_updates += 1

    def train_step(self) -> dict[str, Tensor | float]:
        self._apply_freezing()
        batch = self.batches(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            loss, metrics = self.objective.loss(batch)
        skip = self._any_rank(not bool(torch.isfinite(loss.detach())))
        if skip:
            self.skipped += 1
        else:
            loss.backward()
            self._average_gradients()
            params = [p for p in self.objective.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.optim_cfg.grad_clip)
            metrics = {**metrics, "train/grad_norm": grad_norm}
            self.optimizer.step()
            self._update_ema()
        self.scheduler.step()
        self.step += 1
        return {"loss": loss.detach(), **metrics, "train/skipped": float(skip)}

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
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}  # finite values per key
        start = time.perf_counter()
        while self.step < cfg.iterations:
            metrics = self.train_step()
            for k, v in metrics.items():
                value = float(v.detach()) if isinstance(v, Tensor) else float(v)
                finite = math.isfinite(value)
                sums[k] = sums.get(k, 0.0) + (value if finite else 0.0)
                counts[k] = counts.get(k, 0) + int(finite)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.iterations:
                self._report(sums, counts)
                sums, counts = {}, {}
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.iterations:
                self.seconds += time.perf_counter() - start
                start = time.perf_counter()
                self.save()
                self.checkpoint_seconds += time.perf_counter() - start
        self.seconds += time.perf_counter() - start
        if bar is not None:
            bar.close()
        return {"train/steps": float(self.step), "train/skipped_steps": float(self.skipped),
                "train/seconds": self.seconds, "train/checkpoint_seconds": self.checkpoint_seconds,
                "train/resumed_from_step": float(resumed_from)}

    def _report(self, sums: dict[str, float], counts: dict[str, int]) -> None:
        """Means since the last report over every rank's finite values. Every rank holds the
        same keys (a value non-finite on one rank only still has its key there), so the
        all-reduce lines up; a key with no finite value anywhere is not reported."""
        keys = sorted(sums)
        values = torch.tensor([sums[k] for k in keys] + [float(counts[k]) for k in keys], dtype=torch.float64)
        if self.world > 1:
            values = values.to(self.device)
            dist.all_reduce(values)
            values = values.cpu()
        if self.rank != 0:
            return
        totals, n = values[: len(keys)].tolist(), values[len(keys):].tolist()
        metrics = {k: t / c for k, t, c in zip(keys, totals, n) if c > 0}
        metrics["train/skipped_steps"] = float(self.skipped)
        metrics["train/lr_scale"] = self.scheduler.get_last_lr()[0] / self.optimizer.param_groups[0]["initial_lr"]
        for cb in self.callbacks:
            if hasattr(cb, "on_log"):
                cb.on_log(self.step, metrics)

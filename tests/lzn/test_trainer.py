import copy

import pytest
import torch

from lzn.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from lzn.data.batches import make_batches
from lzn.objectives import GenerationObjective, LatentConfig
from lzn.trainer import OptimConfig, Trainer, TrainConfig, ema_decay
from tests.lzn.toy import ToyDecoder, ToyEncoder, toy_images


def _trainer(run_dir, iterations=6, objective=None, **train_kw):
    torch.manual_seed(0)
    images, labels = toy_images()
    objective = objective or GenerationObjective(ToyEncoder(), ToyDecoder(), LatentConfig(dim=3, steps=4))
    train = TrainConfig(iterations=iterations, batch_size=16, checkpoint_every=2, log_every=1,
                        deterministic=True, progress=False, **train_kw)
    batches = make_batches(images, labels, global_batch=16, seed=0, augment="none", two_view=False)
    optim = OptimConfig(lr={"encoder": 1e-2, "decoder": 1e-2}, warmup=3, ema_decay=0.99)

    class Log:
        def __init__(self):
            self.rows = []

        def on_log(self, step, metrics):
            self.rows.append((step, metrics["loss"]))

    log = Log()
    return Trainer(objective, optim, train, batches, run_dir=run_dir, callbacks=[log]), log


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_resume_continues_bit_identically(tmp_path):
    straight, log_a = _trainer(tmp_path / "a", iterations=6)
    straight.fit()
    first, _ = _trainer(tmp_path / "b", iterations=4)
    first.fit()  # "crash" after step 4: a new trainer resumes from the checkpoint
    resumed, log_b = _trainer(tmp_path / "b", iterations=6)
    summary = resumed.fit()
    assert summary["train/steps"] == 6
    assert [r for r in log_a.rows if r[0] > 4] == log_b.rows
    for p, q in zip(_params(straight.objective), _params(resumed.objective)):
        assert torch.equal(p, q)
    for p, q in zip(_params(straight.ema), _params(resumed.ema)):
        assert torch.equal(p, q)


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    t, _ = _trainer(tmp_path, iterations=8, keep_checkpoints=2)
    t.fit()
    steps = [s for s, _ in list_checkpoints(t.ckpt_dir)]
    assert steps == [6, 8]
    assert not list(t.ckpt_dir.glob(".*.tmp"))


def test_corrupt_checkpoint_is_an_error_not_a_restart(tmp_path):
    t, _ = _trainer(tmp_path, iterations=2)
    t.fit()
    path = latest_checkpoint(t.ckpt_dir)
    path.write_bytes(path.read_bytes()[:100])
    again, _ = _trainer(tmp_path, iterations=4)
    with pytest.raises(CheckpointError, match=path.name):
        again.fit()


class _NaNAt(GenerationObjective):
    def loss(self, batch):
        loss, m = super().loss(batch)
        if int(batch["rng"].generator.initial_seed()) == self.bad_seed:
            loss = loss * float("nan")
        return loss, m


def test_non_finite_loss_skips_the_step(tmp_path):
    obj = _NaNAt(ToyEncoder(), ToyDecoder(), LatentConfig(dim=3, steps=4))
    from lzn.data.stream import StepRandom

    obj.bad_seed = StepRandom(0, 2).generator.initial_seed()  # the batch of step 2
    t, log = _trainer(tmp_path, iterations=4, objective=obj)
    for _ in range(2):
        t.train_step()
    before = _params(t.objective)
    metrics = t.train_step()
    assert metrics["train/skipped"] == 1.0 and t.skipped == 1
    assert all(torch.equal(p, q) for p, q in zip(before, _params(t.objective)))
    t.train_step()
    assert not all(torch.equal(p, q) for p, q in zip(before, _params(t.objective)))


def test_ema_warmup_formula_and_update(tmp_path):
    assert ema_decay(0.999, 0) == pytest.approx(0.1)
    assert ema_decay(0.999, 90) == pytest.approx(91 / 100)
    assert ema_decay(0.999, 10**6) == 0.999
    t, _ = _trainer(tmp_path, iterations=1)
    t.train_step()
    # After one update with decay 0.1: ema = 0.1 * init + 0.9 * param.
    init = _trainer(tmp_path / "x", iterations=1)[0].objective
    for e, p, p0 in zip(t.ema.parameters(), t.objective.parameters(), init.parameters()):
        torch.testing.assert_close(e, 0.1 * p0 + 0.9 * p.detach())


def test_linear_warmup_per_module_lr(tmp_path):
    t, _ = _trainer(tmp_path, iterations=5)
    lrs = []
    for _ in range(4):
        lrs.append({g["name"]: g["lr"] for g in t.optimizer.param_groups})
        t.train_step()
    assert [round(x["encoder"], 8) for x in lrs] == [round(1e-2 * k / 3, 8) for k in (1, 2, 3, 3)]


def test_missing_or_unknown_learning_rate_is_rejected(tmp_path):
    images, labels = toy_images()
    obj = GenerationObjective(ToyEncoder(), ToyDecoder(), LatentConfig(dim=3, steps=4))
    batches = make_batches(images, labels, global_batch=16, seed=0, augment="none", two_view=False)
    with pytest.raises(ValueError, match="missing \\['decoder'\\]"):
        Trainer(obj, OptimConfig(lr={"encoder": 1e-3}), TrainConfig(), batches, run_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown \\['decodr'\\]"):
        Trainer(obj, OptimConfig(lr={"encoder": 1e-3, "decoder": 1, "decodr": 1}), TrainConfig(),
                batches, run_dir=tmp_path)


def test_freeze_after_stops_a_module(tmp_path):
    t, _ = _trainer(tmp_path, iterations=6, freeze_after={"decoder": 3})
    t.fit()
    dec_at_3 = _trainer(tmp_path / "y", iterations=3)[0]
    dec_at_3.fit()
    for p, q in zip(t.objective.decoder.parameters(), dec_at_3.objective.decoder.parameters()):
        assert torch.equal(p, q)
    assert not all(torch.equal(p, q) for p, q in zip(t.objective.encoder.parameters(),
                                                      dec_at_3.objective.encoder.parameters()))


def test_a_frozen_module_keeps_its_ema_through_checkpoint_and_resume(tmp_path):
    """The reference updates a module's EMA only while the module is enabled, and disables it
    at the top of iteration n (generation_trainer.py:750-753, 809-812 and 712-716): the EMA
    of a decoder frozen after n = 3 is that of a run stopped after 3 steps, however the
    frozen run is split by resumes (here across the freeze, and after it)."""
    stopped, _ = _trainer(tmp_path / "stopped", iterations=3)
    stopped.fit()
    want = _params(stopped.ema.decoder)
    assert not all(torch.equal(e, p) for e, p in zip(want, _params(stopped.objective.decoder)))
    for splits in ([6], [2, 6], [4, 6]):
        run = tmp_path / "-".join(map(str, splits))
        for iterations in splits:
            t, _ = _trainer(run, iterations=iterations, freeze_after={"decoder": 3})
            t.fit()
        for e, w in zip(_params(t.ema.decoder), want):
            assert torch.equal(e, w), splits
        # The encoder trains on, and so does its EMA.
        assert not any(torch.equal(e, w) for e, w in zip(_params(t.ema.encoder), _params(stopped.ema.encoder)))


class _MetricNaNAt(GenerationObjective):
    """Reports a metric "m" that is NaN on one step's batch and 2.0 otherwise."""

    def loss(self, batch):
        loss, m = super().loss(batch)
        bad = int(batch["rng"].generator.initial_seed()) == self.bad_seed
        return loss, {**m, "m": float("nan") if bad else 2.0}


def test_reported_means_skip_non_finite_values_without_dropping_the_key(tmp_path):
    from lzn.data.stream import StepRandom

    obj = _MetricNaNAt(ToyEncoder(), ToyDecoder(), LatentConfig(dim=3, steps=4))
    obj.bad_seed = StepRandom(0, 0).generator.initial_seed()  # the batch of step 0
    t, _ = _trainer(tmp_path, iterations=4, objective=obj)
    t.cfg.log_every = 2
    reported = []
    t.callbacks = [type("Log", (), {"on_log": lambda self, step, m: reported.append((step, m.get("m")))})()]
    t.fit()
    # Steps 1-2: one NaN and one 2.0 -> 2.0 (not 1.0, the NaN counted as a zero); steps 3-4: 2.0.
    assert reported == [(2, 2.0), (4, 2.0)]


class _Bar:
    """A tqdm stand-in that records the bars a trainer draws."""

    drawn: list = []

    def __init__(self, *, total, initial, desc, unit, **_tqdm_only):
        self.total, self.n, self.postfix, self.closed = total, initial, None, False
        _Bar.drawn.append(self)

    def update(self, n=1):
        self.n += n

    def set_postfix(self, **values):
        self.postfix = values

    def close(self):
        self.closed = True


def _drawn_bars(run_dir, progress, rank=0, monkeypatch=None):
    """The bars one fit() of 4 steps draws with train.progress=True, at `rank` (faked, world 1)."""
    import lzn.distributed

    if rank:
        monkeypatch.setattr(lzn.distributed, "rank", lambda: rank)
    t, _ = _trainer(run_dir, iterations=4)
    t.cfg.progress = True
    _Bar.drawn = []
    Trainer(t.objective, t.optim_cfg, t.cfg, t.batches, run_dir=run_dir, progress=progress).fit()
    return _Bar.drawn


def test_rank_0_draws_one_bar_with_the_class_it_is_given(tmp_path):
    (bar,) = _drawn_bars(tmp_path, _Bar)
    assert (bar.total, bar.n, bar.closed) == (4, 4, True) and set(bar.postfix) == {"loss"}


def test_other_ranks_and_progress_false_draw_no_bar(tmp_path, monkeypatch):
    assert _drawn_bars(tmp_path / "off", False) == []
    assert _drawn_bars(tmp_path / "rank1", _Bar, rank=1, monkeypatch=monkeypatch) == []


def test_state_keeps_plain_numbers_and_a_checkpoint_of_the_unfused_optimizer_loads(tmp_path):
    """The skipped and EMA-update counters live on the device during training but are plain
    ints in the state; a checkpoint written before the optimizer was fused (param groups
    with fused None, "step" counts on the CPU) resumes into the same run."""
    t, _ = _trainer(tmp_path / "a", iterations=4)
    for _ in range(2):
        t.train_step()
    state = copy.deepcopy(t.state_dict())  # as a file would: no tensor shared with t
    assert type(state["ema_updates"]) is int and state["ema_updates"] == 2
    assert type(state["skipped"]) is int and state["skipped"] == 0
    legacy = {**state, "optimizer": {
        "state": {k: {**v, "step": v["step"].detach().cpu().clone()} for k, v in state["optimizer"]["state"].items()},
        "param_groups": [{**g, "fused": None, "foreach": None} for g in state["optimizer"]["param_groups"]],
    }}
    old, _ = _trainer(tmp_path / "b", iterations=4)
    old.load_state_dict(legacy)
    assert all(g["fused"] for g in old.optimizer.param_groups)
    assert (old.ema_updates, old.skipped) == (2, 0)
    for _ in range(2):
        t.train_step()
        old.train_step()
    for p, q in zip(_params(t.objective), _params(old.objective)):
        assert torch.equal(p, q)
    for p, q in zip(_params(t.ema), _params(old.ema)):
        assert torch.equal(p, q)


def test_a_non_finite_batch_reaches_the_skip_policy_instead_of_raising(tmp_path):
    """The zoning value checks are off during steps: NaN images (here step 1's) give a
    non-finite loss, which skips the step, and training goes on."""
    t, _ = _trainer(tmp_path, iterations=3)
    batches = t.batches

    def poisoned(step):
        batch = batches(step)
        if step == 1:
            batch = {**batch, "images": batch["images"] * float("nan")}
        return batch

    t.batches = poisoned
    t.train_step()
    before = _params(t.objective)
    assert t.train_step()["train/skipped"] == 1.0
    assert all(torch.equal(p, q) for p, q in zip(before, _params(t.objective)))
    assert t.train_step()["train/skipped"] == 0.0 and (t.skipped, t.ema_updates) == (1, 2)


def test_the_ema_is_the_warmed_up_average_of_the_trained_weights(tmp_path):
    """ema_k = d_k ema_{k-1} + (1 - d_k) param_k with d_k = min(decay, (1 + k) / (10 + k)),
    k counting the updates before this one; a skipped step leaves it alone."""
    t, _ = _trainer(tmp_path, iterations=4)
    want = [p.double() for p in _params(t.ema)]
    for k in range(4):
        t.train_step()
        d = ema_decay(t.optim_cfg.ema_decay, k)
        want = [d * w + (1 - d) * p.double() for w, p in zip(want, _params(t.objective))]
    for e, w in zip(_params(t.ema), want):
        torch.testing.assert_close(e.double(), w, rtol=1e-5, atol=1e-6)

"""The `hardware` config group: `hardware=cpu` (the default) is PyTorch's settings on CPU
workers, `hardware=gpu` one GPU per worker with bf16, TF32, NHWC and cuDNN autotuning; and
the parity check that lets `hardware=gpu` train in bf16 autocast."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from lzn.data.batches import make_batches
from lzn.data.digits import digits_split
from lzn.hardware import HardwareConfig
from lzn.task import build_objective
from lzn.trainer import Trainer
from orchestration.run import RayTrainerConfig, RunConfig, validate_run
from pipelines import slurm
from pipelines.config import register, to_run_config

CONF = Path(__file__).resolve().parents[2] / "pipelines" / "conf"
COMMANDS = ("config", "run", "sweep", "evaluate")  # pipelines.train, .run, .sweep, .evaluate

register()


def load(config: str, *overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return to_run_config(compose(config, overrides=list(overrides)))


@pytest.mark.parametrize("config", COMMANDS)
def test_the_default_is_cpu_and_changes_nothing(config):
    cfg = load(config)
    plain = RunConfig()  # the schema's own defaults: what a run did before the group existed
    assert cfg.hardware == HardwareConfig() == plain.hardware
    assert (cfg.trainer.use_gpu, cfg.trainer.cpus_per_worker) == (plain.trainer.use_gpu, plain.trainer.cpus_per_worker)
    assert (cfg.device, cfg.train.bf16) == ("auto", False)
    assert load(config, "hardware=cpu") == cfg


@pytest.mark.parametrize("config", COMMANDS)
def test_gpu_sets_the_workers_device_precision_and_layout(config):
    cfg = load(config, "hardware=gpu")
    assert cfg.hardware == HardwareConfig(tf32=True, channels_last=True, cudnn_benchmark=True, compile=False)
    assert cfg.trainer.use_gpu and cfg.trainer.cpus_per_worker > RayTrainerConfig().cpus_per_worker
    assert cfg.device == "cuda" and cfg.train.bf16
    assert load(config, "hardware=gpu", "hardware.compile=true").hardware.compile


def test_gpu_keeps_the_task_and_the_command_line_wins():
    cfg = load("config", "task=gen_cifar10", "hardware=gpu", "trainer.num_workers=16", "trainer.cpus_per_worker=4")
    task = load("config", "task=gen_cifar10")
    assert (cfg.name, cfg.train.batch_size, cfg.optim) == (task.name, task.train.batch_size, task.optim)
    assert (cfg.trainer.num_workers, cfg.trainer.cpus_per_worker) == (16, 4)
    validate_run(dataclasses.replace(cfg, backend="ray"))


def test_a_slurm_job_composes_its_pipeline_with_the_group():
    cfg, _ = slurm.pipeline_config("train", ["task=gen_digits", "hardware=gpu"])
    assert cfg.trainer.use_gpu and cfg.hardware.tf32
    cfg, _ = slurm.pipeline_config("sweep", ["task=gen_digits", "hardware=gpu"])
    assert cfg.trainer.use_gpu and cfg.train.bf16


@pytest.mark.parametrize("override", ["hardware=tpu", "hardware.tf33=true", "hardware.compile=maybe"])
def test_an_unknown_choice_key_or_value_fails_at_load(override):
    with pytest.raises(Exception, match=r"hardware|tf33|maybe|tpu"):
        load("config", override)


# --------------------------------------------------------------------------- bf16 parity
PARITY_STEPS, WINDOW = 200, 20


def _loss_curve(cfg, bf16: bool, seed: int, run_dir: Path) -> np.ndarray:
    """The loss at each of PARITY_STEPS steps of gen_digits at the smoke scale, on this CPU."""
    train = dataclasses.replace(cfg.train, iterations=PARITY_STEPS, log_every=1, checkpoint_every=PARITY_STEPS,
                                progress=False, bf16=bf16, seed=seed)
    split = digits_split()
    torch.manual_seed(seed)
    objective = build_objective(cfg)
    batches = make_batches(split.train_images, split.train_labels, global_batch=train.batch_size, seed=seed,
                           augment=cfg.data.augment, two_view=False)
    losses = []

    class Log:
        def on_log(self, step, metrics):
            losses.append(metrics["loss"])

    Trainer(objective, cfg.optim, train, batches, run_dir=run_dir, callbacks=[Log()], progress=False).fit()
    assert len(losses) == PARITY_STEPS
    return np.asarray(losses)


@pytest.fixture
def one_thread():
    """One intra-op thread: the same arithmetic whatever the machine, and no busy-waiting
    OpenMP threads on a loaded CI host (these small GEMMs gain nothing from more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bf16_autocast_trains_gen_digits_like_fp32(tmp_path, one_thread):
    """200 steps of gen_digits (smoke scale: batch 8, 4 latent steps) from one seed in fp32 and in
    bf16 autocast (CPU autocast: the bf16 format of a GPU's, on a slightly different list of
    ops). A window of 20 steps averages out the per-step noise of the RF loss (its random
    times and noise), and the yardstick is the same fp32 run from another seed: measured
    here, windows move by up to 9% between seeds (4.8% on average) while bf16 moves them by
    under 1%. So bf16 must stay within 5% in every window, 3% in the last, and closer to
    fp32 than another seed is, on average by a factor of 4; both runs must have learned (the
    last window at most 70% of the first)."""
    cfg = load("config", "task=gen_digits", "scale=smoke", "hardware=gpu")
    assert cfg.train.bf16  # what hardware=gpu trains with
    fp32 = _loss_curve(cfg, False, 0, tmp_path / "fp32")
    bf16 = _loss_curve(cfg, True, 0, tmp_path / "bf16")
    other_seed = _loss_curve(cfg, False, 1, tmp_path / "seed1")
    windows = {k: v.reshape(-1, WINDOW).mean(axis=1) for k, v in
               (("fp32", fp32), ("bf16", bf16), ("other_seed", other_seed))}
    rel = np.abs(windows["bf16"] - windows["fp32"]) / windows["fp32"]
    seed_rel = np.abs(windows["other_seed"] - windows["fp32"]) / windows["fp32"]
    report = f"fp32 {np.round(windows['fp32'], 4)}\nbf16 {np.round(windows['bf16'], 4)}\nrelative {np.round(rel, 4)}"
    assert not np.array_equal(fp32, bf16), "bf16 autocast did not change the arithmetic"
    assert rel.max() <= 0.05, report
    assert rel[-1] <= 0.03, report
    assert rel.mean() * 4 <= seed_rel.mean(), f"{report}\nanother seed: {np.round(seed_rel, 4)}"
    for curve in (windows["fp32"], windows["bf16"]):
        assert curve[-1] <= 0.7 * curve[0], report


# --------------------------------------------------------------------------- a run with them
def test_a_resumed_run_may_change_hardware_but_not_bf16():
    from orchestration.run import refused_changes, run_params

    cpu = run_params(load("config", "task=gen_digits"))
    tuned = run_params(load("config", "task=gen_digits", "hardware=gpu", "train.bf16=false", "hardware.compile=true"))
    assert refused_changes(cpu, tuned) == []  # layout, TF32, compile, device and workers: how it runs
    gpu = run_params(load("config", "task=gen_digits", "hardware=gpu"))
    assert [r.split(":")[0] for r in refused_changes(cpu, gpu)] == ["train.bf16"]  # bf16 changes the arithmetic


def test_train_and_evaluate_applies_the_hardware_section(tmp_path):
    """channels_last reaches the trained weights: torch.save keeps strides, so the checkpoint's
    convolution weights are NHWC, and they load into a plain objective."""
    from lzn.checkpoint import latest_checkpoint, load_checkpoint
    from lzn.data.prepare import PrepareConfig, prepare_dataset
    from orchestration.folder import RunFolder
    from orchestration.run import train_and_evaluate

    prepare_dataset("digits", None, tmp_path / "data" / "digits", PrepareConfig(executor="serial"), progress=False)
    cfg = load("config", "task=gen_digits", "scale=smoke", f"output_dir={tmp_path}", "hardware.channels_last=true",
               f"data.shards_dir={tmp_path / 'data'}")
    train_and_evaluate(cfg, tmp_path / "run", device=torch.device("cpu"), evaluate=False, progress=False)
    state = load_checkpoint(latest_checkpoint(RunFolder(tmp_path / "run").checkpoints))["objective"]
    convs = {k: v for k, v in state.items() if v.dim() == 4 and v.shape[1] > 1 and v.shape[2] > 1}
    assert convs and all(v.is_contiguous(memory_format=torch.channels_last) for v in convs.values())
    assert not all(v.is_contiguous() for v in convs.values())
    build_objective(cfg).load_state_dict(state, strict=True)

"""Task configs: every task loads and validates; a typo or a wrong type fails at load."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from lzn.task import validate_task
from pipelines.config import RunConfig, register, to_run_config

CONF = Path(__file__).resolve().parents[2] / "pipelines" / "conf"
TASKS = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
PAPER_TASKS = {"gen_cifar10", "gen_afhq_cat", "gen_celebahq", "gen_lsun_bedroom", "repr_imagenet", "joint_cifar10"}

register()


def load(*overrides) -> RunConfig:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return to_run_config(compose("config", overrides=list(overrides)))


def test_every_paper_and_digits_task_is_defined():
    assert PAPER_TASKS | {"gen_digits", "repr_digits", "joint_digits", "gen_images", "repr_images",
                          "joint_images"} == set(TASKS)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("scale", ["full", "smoke"])
def test_task_loads_typed_and_validates(task, scale):
    cfg = load(f"task={task}", f"scale={scale}")
    assert isinstance(cfg, RunConfig) and cfg.name == task
    validate_task(cfg)
    assert cfg.run_name == f"{scale}-seed0"
    if scale == "smoke":
        assert cfg.train.iterations <= 4 and cfg.train.batch_size <= 8


def test_paper_hyperparameters_are_the_papers():
    c = load("task=gen_cifar10")
    assert (c.latent.dim, c.train.batch_size, c.train.iterations) == (200, 2000, 50000)
    assert c.optim.lr == {"encoder": 2.5e-5, "decoder": 1e-3} and c.optim.ema_decay == 0.999999
    r = load("task=repr_imagenet")
    assert (r.latent.dim, r.latent.alpha, r.latent.eps, r.align.cutoff) == (256, 0.45, 1e-4, 0.2)
    assert (r.train.batch_size, r.optim.lr["encoder"]) == (8192, 8e-4)
    j = load("task=joint_cifar10")
    assert j.train.freeze_after == {"decoder": 60000} and (j.align.steps, j.align.log) == (100, False)


def test_only_the_256px_generation_decoders_scale_by_sigma():
    """The reference sets scale_by_sigma=True in case_study_1_{afhqcat,celebahq,lsunbedroom}.py
    and False in case_study_1_cifar10.py and case_study_3.py."""
    from lzn.models.layers import replace_config
    from lzn.models.unet import UNET_PRESETS
    from lzn.task import model_presets

    scaled = set()
    for task in TASKS:
        c = load(f"task={task}")
        _, (decoder, overrides) = model_presets(c)  # model.decoder=auto as the task builds it
        if decoder is not None:
            if replace_config(UNET_PRESETS[decoder], overrides).scale_by_sigma:
                scaled.add(task)
    assert scaled == {"gen_afhq_cat", "gen_celebahq", "gen_lsun_bedroom"}


def test_unknown_key_fails_at_load():
    with pytest.raises(ValueError, match="train.iteratons"):
        load("task=gen_digits", "+train.iteratons=5")
    with pytest.raises(ConfigCompositionException, match="latent.dims"):
        load("task=gen_digits", "latent.dims=5")


def test_wrong_type_fails_at_load():
    with pytest.raises((ValidationError, ConfigCompositionException), match="iterations"):
        load("task=gen_digits", "train.iterations=many")


def test_unknown_registry_names_fail_validation():
    for override, match in [("model.encoder=resnet9000", "model.encoder"), ("latent.solver=rk4", "latent.solver"),
                            ("objective=gan", "objective"), ("data.augment=mixup", "data.augment")]:
        with pytest.raises(ValueError, match=match):
            validate_task(load("task=gen_digits", override))


@pytest.mark.parametrize("override,match", [
    ("latent.eps=0.5", "latent.eps"),               # DPM-Solver++'s grid g -> 1 - g would collapse
    ("eval.is_splits=0", "eval.is_splits"),
    ("eval.kid_pr_samples=3", "eval.kid_pr_samples"),
    ("eval.reconstruction_draws=0", "eval.reconstruction_draws"),
    ("eval.reconstruction_samples=-1", "eval.reconstruction_samples"),
])
def test_evaluation_and_solver_ranges_fail_validation(override, match):
    """Settings that would only fail after training, or after every sample is generated."""
    with pytest.raises(ValueError, match=match):
        validate_task(load("task=gen_digits", override))
    validate_task(load("task=gen_digits", "latent.solver=euler", "latent.eps=0.5") if override == "latent.eps=0.5"
                  else load("task=gen_digits"))

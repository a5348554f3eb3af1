"""The run schema's roles, held to what each setting is for (docs: resuming, sweeps, the
evaluation's key): changing what is trained refuses a resume; how long, where, how it runs
and how it is evaluated may change."""
import pytest

from lzn.roles import Role
from lzn.trainer import OptimConfig
from orchestration.run import RUN_ROLES, RunConfig, refused_changes, run_params

# (key, role) for settings whose purpose the docs state.
EXPECTED = {
    "name": Role.TASK, "objective": Role.TASK, "data.name": Role.TASK, "data.image_size": Role.TASK,
    "model.encoder": Role.MODEL, "latent.dim": Role.MODEL, "align.steps": Role.MODEL, "symmetric": Role.MODEL,
    "optim.lr": Role.TRAINING, "train.seed": Role.TRAINING, "train.batch_size": Role.TRAINING,
    "data.augment": Role.TRAINING,
    "train.iterations": Role.LENGTH,
    "train.checkpoint_every": Role.RUNTIME, "train.log_every": Role.RUNTIME, "trainer.num_workers": Role.RUNTIME,
    "tracking.uri": Role.RUNTIME, "backend": Role.RUNTIME, "device": Role.RUNTIME, "output_dir": Role.RUNTIME,
    "data.shards_dir": Role.RUNTIME, "data.root": Role.RUNTIME, "data.loader": Role.RUNTIME,
    "eval.inception_weights": Role.RUNTIME,
    "eval.fid_samples": Role.EVALUATION, "eval.batch_size": Role.EVALUATION,
}


@pytest.mark.parametrize("key, role", sorted(EXPECTED.items(), key=lambda kv: kv[0]))
def test_each_setting_has_the_role_its_purpose_gives(key, role):
    assert RUN_ROLES.of(key) is role


def test_every_setting_of_a_run_has_a_role():
    assert [k for k in run_params(RunConfig()) if RUN_ROLES.of(k) is None] == []


def test_a_resume_may_change_how_long_and_where_but_not_what_is_trained():
    old = run_params(RunConfig(optim=OptimConfig(lr={"encoder": 1e-3, "decoder": 1e-3})))
    new = {**old, "train.iterations": "5000", "trainer.num_workers": "8", "eval.fid_samples": "100",
           "backend": "ray"}
    assert refused_changes(old, new) == []
    changed = {**old, "optim.lr.encoder": "0.5", "latent.dim": "7"}
    assert sorted(r.split(":")[0] for r in refused_changes(old, changed)) == ["latent.dim", "optim.lr.encoder"]

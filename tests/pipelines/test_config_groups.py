"""An unknown config group choice (task=, scale=, data=, ...) names the closest known ones."""
from pipelines.cli import unknown_group_choice


def test_a_misspelt_task_suggests_the_close_ones():
    problem = unknown_group_choice(["task=gen_imags", "data.root=/x"])
    assert problem.startswith("task='gen_imags' is not known; did you mean gen_images")
    assert "repr_imagenet" in problem  # the known list follows


def test_known_choices_keys_and_values_pass():
    assert unknown_group_choice(["task=gen_images", "data=imagefolder", "scale=smoke", "data.root=/a=b",
                                 "+hardware=cpu", "train.iterations=3"]) is None


def test_each_group_and_each_multirun_choice_is_checked():
    assert "did you mean smoke" in unknown_group_choice(["scale=smok"])
    assert "'gen_digts'" in unknown_group_choice(["task=gen_digits,gen_digts"])
    assert "did you mean" not in unknown_group_choice(["task=zzzz"])

"""pipelines.dag on toy stages: content keys decide what runs."""
import pytest

from pipelines.dag import Pipeline, Stage, StageFailed


class Toy:
    """a -> b -> c, each writing one file from its input and its setting."""

    def __init__(self, folder):
        self.folder, self.settings, self.ran, self.fail = folder, {"a": 1, "b": 1, "c": 1}, [], set()

    def stage(self, name, needs=()):
        def run():
            if name in self.fail:
                raise RuntimeError(f"{name} broke")
            self.ran.append(name)
            upstream = "".join((self.folder / f"{d}.txt").read_text() for d in needs)
            out = self.folder / f"{name}.txt"
            out.write_text(f"{upstream}{name}{self.settings[name]};")
            return {"out": out}

        return Stage(name, run, inputs=lambda: {"setting": self.settings[name]}, needs=needs)

    def pipeline(self):
        return Pipeline([self.stage("a"), self.stage("b", ("a",)), self.stage("c", ("b",))], self.folder / "state",
                        log=lambda msg: None)

    def go(self, selected=None):
        self.ran = []
        return self.pipeline().run(selected), self.ran


def test_a_rerun_skips_every_stage_that_is_done(tmp_path):
    toy = Toy(tmp_path)
    assert toy.go() == ({"a": "ran", "b": "ran", "c": "ran"}, ["a", "b", "c"])
    assert toy.go() == ({"a": "skipped", "b": "skipped", "c": "skipped"}, [])


def test_a_changed_setting_reruns_exactly_the_stages_that_depend_on_it(tmp_path):
    toy = Toy(tmp_path)
    toy.go()
    toy.settings["b"] = 2
    assert toy.go()[1] == ["b", "c"]
    toy.settings["c"] = 5
    assert toy.go()[1] == ["c"]


def test_an_upstream_rerun_with_the_same_output_does_not_propagate(tmp_path):
    toy = Toy(tmp_path)
    toy.go()
    (tmp_path / "a.txt").write_text("a1;")  # rewritten, same content: a new mtime, the same digest
    assert toy.go()[1] == []


def test_an_altered_or_deleted_output_reruns_its_stage(tmp_path):
    toy = Toy(tmp_path)
    toy.go()
    (tmp_path / "b.txt").write_text("tampered")
    assert toy.go()[1] == ["b"]  # b writes what it wrote before: c's input is unchanged
    (tmp_path / "c.txt").unlink()
    assert toy.go()[1] == ["c"]


def test_a_failure_names_the_stage_keeps_the_earlier_ones_and_resumes_there(tmp_path):
    toy = Toy(tmp_path)
    toy.fail = {"b"}
    with pytest.raises(StageFailed, match="stage 'b' failed: RuntimeError: b broke") as err:
        toy.go()
    assert err.value.stage == "b" and toy.ran == ["a"]
    assert (tmp_path / "a.txt").exists() and (tmp_path / "state" / "a.json").exists()
    toy.fail = set()
    assert toy.go()[1] == ["b", "c"]  # a is not redone


def test_selected_stages_need_their_upstream_done(tmp_path):
    toy = Toy(tmp_path)
    with pytest.raises(ValueError, match=r"stage 'c' needs \['b'\]"):
        toy.go(["c"])
    toy.go(["a", "b"])
    assert toy.go(["c"])[1] == ["c"]
    with pytest.raises(ValueError, match=r"stages=\['d'\] are not known"):
        toy.go(["d"])


def test_stages_must_come_after_what_they_need(tmp_path):
    toy = Toy(tmp_path)
    with pytest.raises(ValueError, match="needs"):
        Pipeline([toy.stage("b", ("a",)), toy.stage("a")], tmp_path)

"""A run's identity and its output folder (issue 8, section 2).

A stopped or finished run in ``--out`` is reused only for the same recipe, source model (checkpoint fingerprint) and
calibration data; anything else is an error or ``overwrite``. Finished runs with damaged files are redone; two runs
cannot share a partial folder (flock + pid); ``overwrite`` never replaces a folder that is not a run; checks that the
config can answer run before the profiling pass; failures before any saved work leave no partial folder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import testbed_model_path as model_folder

from moecompress.checkpoint import checkpoint_fingerprint
from moecompress.cli import main
from moecompress.errors import MoECompressError, RecipeError, RunInterrupted, TaskError
from moecompress.evals.stage import EvaluateStage
from moecompress.models.tiny import tiny_model
from moecompress.pipeline import LOCK_FILE, Pipeline, RunLock, Stage, StageResult, _PipelineRun, register_stage
from moecompress.pruning.frequency import FrequencyPruning

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

MX, Q3 = "moe-ref-mx", "moe-ref-q3"


@pytest.fixture()
def calibration(testbed):
    return {"files": [str(testbed / "calib" / "pycode.jsonl")], "num_samples": 4, "seq_len": 16}


class _Probe:
    """What the probe stage does on its next runs: raise ``failures`` (one per run), or call ``action``."""

    failures: list[BaseException] = []
    action = None


@register_stage
class ReliabilityProbe(Stage):
    """Test stage: raises the next queued failure, or runs ``_Probe.action(context)``; records nothing else."""

    method = "test_reliability_probe"
    modifies_model = False

    def run(self, context):
        if _Probe.failures:
            raise _Probe.failures.pop(0)
        if _Probe.action is not None:
            _Probe.action(context)
        return StageResult(metrics={"ran": True})


@pytest.fixture(autouse=True)
def _reset_probe():
    _Probe.failures, _Probe.action = [], None
    yield
    _Probe.failures, _Probe.action = [], None


def _partials(out):
    return sorted(out.parent.glob(f"{out.name}.partial-*"))


def _count_calls(monkeypatch, cls, name):
    calls = []
    original = getattr(cls, name)

    def counted(self, *args, **kwargs):
        calls.append(name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


# ----- fingerprint ----------------------------------------------------------------------------------------------
def test_fingerprint_is_the_same_for_copies_and_differs_for_other_weights_with_equal_headers(tmp_path):
    tiny_model("mixtral", seed=0).save_pretrained(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    tiny_model("mixtral", seed=1).save_pretrained(tmp_path / "retrained")  # same names, shapes, offsets
    header = lambda folder: (folder / "model.safetensors").read_bytes()[:4096]  # noqa: E731
    assert header(tmp_path / "a")[:200] == header(tmp_path / "retrained")[:200]
    fingerprint = checkpoint_fingerprint(tmp_path / "a")
    assert checkpoint_fingerprint(tmp_path / "copy") == fingerprint
    assert checkpoint_fingerprint(tmp_path / "retrained") != fingerprint
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    config["num_experts_per_tok"] = 1
    (tmp_path / "copy" / "config.json").write_text(json.dumps(config))
    assert checkpoint_fingerprint(tmp_path / "copy") != fingerprint


# ----- another model, another calibration: never reused ------------------------------------------------------
def test_finished_run_of_another_model_is_an_error_and_overwrite_replaces_it(tmp_path, calibration):
    out = tmp_path / "out"
    Pipeline([], calibration=calibration).run(model_folder(MX), out)
    with pytest.raises(MoECompressError, match=r"holds a finished moecompress run \(another source model\).*--overwrite"):
        Pipeline([], calibration=calibration).run(model_folder(Q3), out)
    assert json.loads((out / "report.json").read_text())["model"]["source"] == str(model_folder(MX))
    report = Pipeline([], calibration=calibration).run(model_folder(Q3), out, overwrite=True)
    assert report["model"]["source"] == str(model_folder(Q3))
    assert len(report["calibration"]["expert_token_counts"][0]) == 32  # q3's profile, not mx's (8 experts)
    assert json.loads((out / "state.json").read_text())["source_fingerprint"] == checkpoint_fingerprint(model_folder(Q3))
    assert not _partials(out)


def test_stopped_run_of_another_model_is_not_resumed(tmp_path, calibration, monkeypatch):
    out = tmp_path / "out"
    stages = lambda: [ReliabilityProbe()]  # noqa: E731
    _Probe.failures = [RuntimeError("stopped on purpose")]
    with pytest.raises(RuntimeError, match="stopped on purpose"):
        Pipeline(stages(), calibration=calibration).run(model_folder(MX), out)
    (partial,) = _partials(out)
    assert json.loads((partial / "state.json").read_text())["profile"]  # the profile would be resumed
    with pytest.raises(MoECompressError, match=r"holds a stopped moecompress run \(another source model\)"):
        Pipeline(stages(), calibration=calibration).run(model_folder(Q3), out)
    profiles = _count_calls(monkeypatch, _PipelineRun, "_profile")
    report = Pipeline(stages(), calibration=calibration).run(model_folder(Q3), out, overwrite=True)
    assert profiles == ["_profile"]  # mx's profile was discarded, q3 profiled afresh
    assert len(report["calibration"]["expert_token_counts"][0]) == 32
    assert not _partials(out)


def test_other_calibration_data_is_another_run(tmp_path, testbed):
    data = tmp_path / "calib.jsonl"
    shutil.copy(testbed / "calib" / "pycode.jsonl", data)
    calibration = {"files": [str(data)], "num_samples": 4, "seq_len": 16}
    out = tmp_path / "out"
    Pipeline([], calibration=calibration).run(model_folder(MX), out)
    lines = data.read_text().splitlines()
    data.write_text("\n".join(reversed(lines)) + "\n")  # same recipe (same path), other tokens
    with pytest.raises(MoECompressError, match=r"\(other calibration data\)"):
        Pipeline([], calibration=calibration).run(model_folder(MX), out)


def test_a_run_from_an_older_version_is_not_taken_for_this_one(tmp_path, calibration):
    out = tmp_path / "out"
    Pipeline([], calibration=calibration).run(model_folder(MX), out)
    state = json.loads((out / "state.json").read_text())
    for key in ("format", "source_fingerprint", "calibration_sha256"):
        state.pop(key)
    (out / "state.json").write_text(json.dumps(state))
    with pytest.raises(MoECompressError, match="older moecompress version"):
        Pipeline([], calibration=calibration).run(model_folder(MX), out)


# ----- a finished run is done only when its files are intact -----------------------------------------------------
def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _scramble_header(path):
    data = bytearray(path.read_bytes())
    data[8:40] = b"#" * 32  # same size, broken header
    path.write_bytes(bytes(data))


def _weights_file(out):
    """The run's (first) weights file: one file in memory, one shard per decoder layer when streamed."""
    return sorted(out.glob("model*.safetensors"))[0]


@pytest.mark.parametrize("damage", [
    pytest.param(lambda out: _weights_file(out).unlink(), id="model-file-missing"),
    pytest.param(lambda out: _truncate(_weights_file(out)), id="model-file-truncated"),
    pytest.param(lambda out: _scramble_header(_weights_file(out)), id="model-header-corrupt"),
    pytest.param(lambda out: (out / "config.json").unlink(), id="config-missing"),
    pytest.param(lambda out: (out / "report.json").unlink(), id="report-missing"),
])
def test_finished_run_with_damaged_files_is_redone_not_reported_done(tmp_path, calibration, monkeypatch, damage):
    out = tmp_path / "out"
    stages = lambda: [FrequencyPruning({"num_experts_to_keep": 6})]  # noqa: E731
    runs = _count_calls(monkeypatch, FrequencyPruning, "run")
    Pipeline(stages(), calibration=calibration).run(model_folder(MX), out)
    Pipeline(stages(), calibration=calibration).run(model_folder(MX), out)
    assert runs == ["run"]  # intact: reused, not redone
    damage(out)
    report = Pipeline(stages(), calibration=calibration).run(model_folder(MX), out)
    assert runs == ["run", "run"]  # damaged: made again
    assert report["stages"][0]["decisions"]["kept_experts"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, experts_implementation="eager")
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 6
    assert (out / "report.json").is_file() and not (out / LOCK_FILE).exists() and not _partials(out)


# ----- two runs, one folder --------------------------------------------------------------------------------------
def test_a_live_lock_refuses_a_second_run_and_a_dead_pid_is_taken_over(tmp_path, calibration):
    out = tmp_path / "out"
    pipeline = Pipeline([], calibration=calibration)
    partial = _PipelineRun(pipeline, model_folder(MX), out, device=None, dtype="auto", overwrite=False,
                           progress=None).partial_dir
    partial.mkdir()
    holder = RunLock(partial)
    holder.acquire()  # another run, alive, works in this partial folder
    try:
        with pytest.raises(MoECompressError, match=r"another moecompress run \(pid \d+ on .*\) is writing"):
            pipeline.run(model_folder(MX), out)
        with pytest.raises(MoECompressError, match="another moecompress run"):
            pipeline.run(model_folder(MX), out, overwrite=True)  # --overwrite does not break a live lock
        assert not out.exists() and partial.is_dir()
    finally:
        holder.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (partial / LOCK_FILE).write_text(f"pid {dead.stdout.strip()} on somewhere since long ago\n")
    report = pipeline.run(model_folder(MX), out)  # the dead holder's lock is taken over
    assert report["super_experts"] is not None and not (out / LOCK_FILE).exists() and not _partials(out)


def test_a_run_that_finished_into_out_meanwhile_is_not_overwritten(tmp_path, calibration):
    out = tmp_path / "out"

    def another_run_finishes(context):  # while this run works, another recipe's run lands in --out
        out.mkdir()
        (out / "state.json").write_text(json.dumps({"format": "moecompress-run/1", "recipe_sha256": "x",
                                                    "source_fingerprint": "y", "stages": {}, "finished": True}))

    _Probe.action = another_run_finishes
    with pytest.raises(MoECompressError, match="written by another run while this one worked.*kept in"):
        Pipeline([ReliabilityProbe()], calibration=calibration).run(model_folder(MX), out)
    assert json.loads((out / "state.json").read_text())["recipe_sha256"] == "x"
    (partial,) = _partials(out)
    assert json.loads((partial / "state.json").read_text())["finished"] is True


# ----- --overwrite and folders that are not runs ----------------------------------------------------------------
def test_overwrite_never_replaces_a_folder_that_is_not_a_run(tmp_path, calibration):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my thesis")
    for overwrite in (False, True):
        with pytest.raises(MoECompressError, match="is not a moecompress run folder.*notes.txt") as error:
            Pipeline([], calibration=calibration).run(model_folder(MX), out, overwrite=overwrite)
        assert "another run" not in str(error.value)
    assert (out / "notes.txt").read_text() == "my thesis" and not _partials(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    Pipeline([], calibration=calibration).run(model_folder(MX), empty)  # an empty folder is free
    assert (empty / "report.json").is_file()


def test_overwrite_never_deletes_files_the_user_added_to_a_run_folder(tmp_path, calibration):
    out = tmp_path / "out"
    Pipeline([], calibration=calibration).run(model_folder(MX), out)
    (out / "my_notes.md").write_text("keep me")
    assert Pipeline([], calibration=calibration).run(model_folder(MX), out)["stages"] == []  # reuse deletes nothing
    with pytest.raises(MoECompressError, match="files it did not write \\(my_notes.md\\).*would delete them"):
        Pipeline([], calibration=calibration).run(model_folder(Q3), out, overwrite=True)
    assert (out / "my_notes.md").read_text() == "keep me" and not _partials(out)


@pytest.mark.parametrize("case", ["out-is-a-file", "out-under-a-file", "recipe-is-a-folder", "empty-recipe",
                                  "comments-only-recipe", "recipe-missing"])
def test_path_mistakes_are_one_line_errors(tmp_path, capsys, case):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stages: []\n")
    out = tmp_path / "out"
    if case == "out-is-a-file":
        out.write_text("x")
    elif case == "out-under-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    elif case == "recipe-is-a-folder":
        recipe = tmp_path
    elif case == "empty-recipe":
        recipe.write_text("")
    elif case == "comments-only-recipe":
        recipe.write_text("# nothing yet\n\n")
    else:
        recipe = tmp_path / "nowhere.yaml"
    code = main(["compress", str(model_folder(MX)), "--recipe", str(recipe), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    expected = {"out-is-a-file": "is a file", "out-under-a-file": "which is a file", "recipe-is-a-folder": "is a folder",
                "empty-recipe": "is empty", "comments-only-recipe": "is empty", "recipe-missing": "does not exist"}
    assert expected[case] in err
    assert not list(tmp_path.glob("*.partial-*")) and not list((tmp_path / "file").parent.glob("file.partial-*"))


# ----- every check the config can answer runs before the profiling pass -------------------------------------------
@pytest.mark.parametrize("stages, calibration_change, error, message", [
    pytest.param([FrequencyPruning({"num_experts_to_keep": 40})], {}, RecipeError, "layer 0 has only 8 experts",
                 id="expert-count"),
    pytest.param([FrequencyPruning({"num_experts_to_keep": 4, "top_k": 5})], {}, RecipeError,
                 "top_k=5 exceeds the 4 experts", id="top-k"),
    pytest.param([ReliabilityProbe(), EvaluateStage({"tasks": ["tb_code_next"], "include_path": "/no/such/tasks"})],
                 {}, TaskError, "task folder .*no/such/tasks does not exist", id="eval-task-folder"),
    # an unknown name makes lm-eval index all of its own tasks (about a minute here), hence slow
    pytest.param([ReliabilityProbe(), EvaluateStage({"tasks": ["tb_no_such_task"]})], {}, TaskError,
                 "unknown evaluation task.*tb_no_such_task", id="unknown-eval-task", marks=pytest.mark.slow),
    pytest.param([], {"seq_len": 4096}, RecipeError,
                 r"seq_len=4096 exceeds the model's context \(max_position_embeddings=2048\)", id="seq-len-above-context"),
])
def test_impossible_recipes_fail_before_the_profiling_pass(tmp_path, calibration, monkeypatch, stages,
                                                           calibration_change, error, message):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the recipe was checked")

    monkeypatch.setattr(_PipelineRun, "_profile", no_work)
    monkeypatch.setattr(_PipelineRun, "_calibration", no_work)
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        Pipeline(stages, calibration={**calibration, **calibration_change}).run(model_folder(MX), out)
    assert not out.exists() and not _partials(out)


def test_a_folder_without_tokenizer_fails_before_work(tmp_path, calibration):
    source = tmp_path / "model"
    tiny_model("mixtral").save_pretrained(source)
    with pytest.raises(MoECompressError, match="no tokenizer files"):
        Pipeline([], calibration=calibration).run(source, tmp_path / "out")
    assert not list(tmp_path.glob("out*"))


# ----- failures: no empty partial folders; Ctrl-C says whether the run resumes ------------------------------------
def test_failures_before_saved_work_leave_no_partial_folder(tmp_path, calibration, monkeypatch):
    out = tmp_path / "out"

    def broken_profile(*args, **kwargs):
        raise RuntimeError("profiling failed")

    with monkeypatch.context() as patch:
        patch.setattr(_PipelineRun, "_profile", broken_profile)
        with pytest.raises(RuntimeError, match="profiling failed"):
            Pipeline([], calibration=calibration).run(model_folder(MX), out)
    assert not _partials(out) and not out.exists()

    def interrupted_profile(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(_PipelineRun, "_profile", interrupted_profile)
        with pytest.raises(RunInterrupted, match="before any work was saved"):
            Pipeline([], calibration=calibration).run(model_folder(MX), out)
    assert not _partials(out) and not out.exists()


def test_ctrl_c_after_the_profile_keeps_the_run_and_it_resumes(tmp_path, calibration, monkeypatch):
    out = tmp_path / "out"
    _Probe.failures = [KeyboardInterrupt()]
    with pytest.raises(RunInterrupted, match="can be resumed: re-run the same command") as interrupt:
        Pipeline([ReliabilityProbe()], calibration=calibration).run(model_folder(MX), out)
    assert isinstance(interrupt.value, KeyboardInterrupt)  # still a KeyboardInterrupt for code that stops on Ctrl-C
    (partial,) = _partials(out)
    assert str(partial) in str(interrupt.value)
    profiles = _count_calls(monkeypatch, _PipelineRun, "_profile")
    report = Pipeline([ReliabilityProbe()], calibration=calibration).run(model_folder(MX), out)
    assert profiles == [] and report["stages"][0]["metrics"] == {"ran": True}
    assert not _partials(out)

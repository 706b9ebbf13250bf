"""Pipeline runs: profiling-only runs, stage decisions in the report, resume after a failure, output-folder rules,
statistics reuse, super-expert protection."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import testbed_model_path as model_folder

from moecompress.errors import MoECompressError, RecipeError
from moecompress.pipeline import Pipeline, RunContext, Stage, StageResult, register_stage
from moecompress.pruning.frequency import FrequencyPruning, select_most_used

CALIBRATION = {"num_samples": 8, "seq_len": 32}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture()
def calibration_config(testbed):
    return {**CALIBRATION, "files": [str(testbed / "calib")]}


class _Failure:
    remaining = 0


@register_stage
class FailingProbe(Stage):
    """Test stage: raises while ``_Failure.remaining > 0``; otherwise records how many experts each layer has."""

    method = "test_failing_probe"
    modifies_model = False

    def run(self, context):
        if _Failure.remaining > 0:
            _Failure.remaining -= 1
            raise RuntimeError("stopped on purpose")
        from moecompress.models import find_moe_blocks

        return StageResult(metrics={"experts": [view.num_experts for view in find_moe_blocks(context.model)]})


def test_profile_only_run_writes_the_report_and_no_model(tmp_path, calibration_config):
    source = model_folder("moe-ref-q3")
    report = Pipeline([], calibration=calibration_config).run(source, tmp_path / "out", dtype="float32")
    out = tmp_path / "out"
    written = {p.name for p in out.iterdir()}
    assert {"report.json", "state.json"} <= written
    assert not written & {"config.json", "model.safetensors", "tokenizer.json"}  # profiling copies no model
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["calibration"]["sha256"] == report["calibration"]["sha256"]
    for key in ("recipe", "versions", "calibration", "super_experts", "model", "stages", "timings", "peak_memory_bytes"):
        assert key in on_disk
    assert on_disk["stages"] == [] and on_disk["recipe"]["stages"] == []
    assert on_disk["versions"]["torch"] == torch.__version__.split("+")[0] or on_disk["versions"]["torch"].startswith(torch.__version__[:4])
    usage = on_disk["calibration"]["expert_usage_by_domain"]
    assert len(usage) == 8 and all(len(per_layer) == 6 and len(per_layer[0]) == 32 for per_layer in usage.values())
    # per-domain usage adds up to the overall counts, which add up to top_k x tokens
    total = torch.tensor([per_layer for per_layer in usage.values()]).sum(0)
    assert torch.equal(total, torch.tensor(on_disk["calibration"]["expert_token_counts"]))
    assert int(total[0].sum()) == 4 * CALIBRATION["num_samples"] * CALIBRATION["seq_len"]
    assert on_disk["model"]["parameters_before"] == on_disk["model"]["parameters_after"]
    assert not list(tmp_path.glob("out.partial-*"))


def test_frequency_pruning_run_records_decisions_and_resumes_after_a_failure(tmp_path, calibration_config, monkeypatch):
    source = model_folder("moe-ref-q3")
    out = tmp_path / "run"
    stages = [FrequencyPruning({"num_experts_to_keep": 24}), FailingProbe()]
    _Failure.remaining = 1
    with pytest.raises(RuntimeError, match="stopped on purpose"):
        Pipeline(stages, calibration=calibration_config).run(source, out, dtype="float32")
    assert not out.exists()  # nothing is published before the run completes
    partial = next(tmp_path.glob("run.partial-*"))
    state = json.loads((partial / "state.json").read_text())
    assert list(state["stages"]) == ["0:prune_frequency"] and not state["finished"]

    calls = {"run": 0, "replay": 0}
    original_run, original_replay = FrequencyPruning.run, FrequencyPruning.replay
    monkeypatch.setattr(FrequencyPruning, "run", lambda self, ctx: (calls.__setitem__("run", calls["run"] + 1), original_run(self, ctx))[1])
    monkeypatch.setattr(FrequencyPruning, "replay", lambda self, ctx, res: (calls.__setitem__("replay", calls["replay"] + 1), original_replay(self, ctx, res))[1])
    report = Pipeline(stages, calibration=calibration_config).run(source, out, dtype="float32")
    assert calls == {"run": 0, "replay": 1}  # the finished stage was replayed from its decisions, not recomputed
    assert report["stages"][0]["resumed"] is True
    assert report["stages"][1]["metrics"]["experts"] == [24] * 6  # the replayed edit is in the model
    kept = report["stages"][0]["decisions"]["kept_experts"]
    counts = report["calibration"]["expert_token_counts"]
    for layer, kept_ids in kept.items():
        layer_counts = torch.tensor(counts[int(layer)])
        assert len(kept_ids) == 24
        dropped = sorted(set(range(32)) - set(kept_ids))
        protected = {e for l, e in report["super_experts"] if l == int(layer)}
        assert protected <= set(kept_ids)
        assert layer_counts[dropped].max() <= layer_counts[[e for e in kept_ids if e not in protected]].min()
    assert not list(tmp_path.glob("run.partial-*"))
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, experts_implementation="eager")
    assert reloaded.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 24
    assert report["model"]["parameters_after"] < report["model"]["parameters_before"]

    # a finished run with the same recipe is not redone; a different recipe needs --overwrite
    again = Pipeline(stages, calibration=calibration_config).run(source, out, dtype="float32")
    assert again["calibration"]["sha256"] == report["calibration"]["sha256"] and calls["run"] == 0
    with pytest.raises(MoECompressError, match="--overwrite"):
        Pipeline([FrequencyPruning({"num_experts_to_keep": 16})], calibration=calibration_config).run(source, out, dtype="float32")


def test_output_inside_the_input_folder_is_refused(tmp_path, calibration_config):
    source = tmp_path / "model"
    shutil.copytree(model_folder("moe-ref-mx"), source)
    for out in (source, source / "compressed"):
        with pytest.raises(MoECompressError, match="never writes into its input"):
            Pipeline([], calibration=calibration_config).run(source, out)
    with pytest.raises(MoECompressError, match="contains the input model folder"):
        Pipeline([], calibration=calibration_config).run(source, tmp_path)
    assert sorted(p.name for p in source.iterdir()) == sorted(p.name for p in model_folder("moe-ref-mx").iterdir())


def test_impossible_option_fails_before_any_stage_runs(tmp_path, calibration_config):
    _Failure.remaining = 0
    stages = [FailingProbe(), FrequencyPruning({"num_experts_to_keep": 40})]
    with pytest.raises(RecipeError, match="num_experts_to_keep=40 but layer 0 has only 32 experts"):
        Pipeline(stages, calibration=calibration_config).run(model_folder("moe-ref-q3"), tmp_path / "o", dtype="float32")


def test_super_experts_are_never_pruned_and_follow_the_edit(testbed):
    from transformers import AutoTokenizer

    from moecompress.calibration import load_calibration
    from moecompress.checkpoint import load_model

    model, _ = load_model(model_folder("moe-ref-mx"), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_folder("moe-ref-mx"))
    calibration = load_calibration(tokenizer, files=[testbed / "calib"], num_samples=4, seq_len=32)
    context = RunContext(model=model, tokenizer=tokenizer, source="mx", output_dir=testbed, calibration=calibration)
    counts = context.statistics(["expert_token_counts"])
    least_used = int(counts[2]["expert_token_counts"].argmin())
    context.super_experts = [(2, least_used)]
    result = FrequencyPruning({"num_experts_to_keep": 3}).run(context)
    kept = result.decisions["kept_experts"]["2"]
    assert least_used in kept and len(kept) == 3
    assert context.super_experts == [(2, kept.index(least_used))]
    assert context.calibration_passes == 1  # the stage reused the pass above
    assert context.statistics_stale  # the edit made the cached statistics stale
    with pytest.raises(RecipeError, match="super experts"):
        select_most_used(torch.arange(8), 1, [0, 5])

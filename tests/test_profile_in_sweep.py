"""A GPTQ-only streamed recipe runs no profiling pass: the report's profile (super experts, expert usage) is
collected in each layer's first pass of the GPTQ sweep (``moecompress.pipeline``, ``_sweep_profiles``).

The first MoE layer's inputs are the same in both (nothing before it is quantised), so its counts equal the
profiling pass's exactly; later layers see the quantised layers' outputs, which the report says. A stopped run
keeps what the finished layers measured."""

from __future__ import annotations

import pytest
from conftest import testbed_model_path as model_folder

from moecompress.errors import RunInterrupted
from moecompress.pipeline import Pipeline
from moecompress.quantization import sequential

pytestmark = pytest.mark.usefixtures("one_thread")

GPTQ = {"method": "gptq", "bits": 3, "group_size": 32}


@pytest.fixture()
def recipe(testbed):
    return {"calibration": {"files": [str(testbed / "calib")], "num_samples": 4, "seq_len": 32},
            "stages": [GPTQ]}


def test_gptq_only_runs_no_profiling_pass_and_reports_the_profile_from_the_sweep(tmp_path, recipe):
    swept = Pipeline.from_recipe(recipe).run(model_folder("moe-ref-q3"), tmp_path / "swept")
    profiled = Pipeline.from_recipe(recipe).run(model_folder("moe-ref-q3"), tmp_path / "profiled",
                                                execution="in_memory")  # in memory: the profiling pass runs
    assert "profile" not in swept["timings"] and "profile" in profiled["timings"]
    assert "stream layers" in swept["timings"]
    first_a, first_b = (report["calibration"]["expert_token_counts"][0] for report in (swept, profiled))
    assert first_a == first_b and sum(first_a) == 4 * 32 * 4  # every token's top-4 picks of layer 0
    for domain, usage in profiled["calibration"]["expert_usage_by_domain"].items():
        assert swept["calibration"]["expert_usage_by_domain"][domain][0] == usage[0]
    assert swept["calibration"]["moe_layers"] == profiled["calibration"]["moe_layers"]
    assert swept["super_experts"] == profiled["super_experts"] and len(swept["super_experts"]) == 1
    assert swept["super_experts_detail"]["measured_in"].startswith("gptq sweep")
    assert "measured_in" not in profiled["super_experts_detail"]
    assert swept["super_experts_after"] == swept["super_experts"]
    assert swept["model"]["parameters_before"] == profiled["model"]["parameters_before"]


def test_a_stopped_run_keeps_the_profile_of_its_finished_layers(tmp_path, recipe, monkeypatch):
    original = sequential._GPTQLayer.run

    def stop_at_layer_3(self):
        if self.layer_index == 3 and not getattr(stop_at_layer_3, "resumed", False):
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(sequential._GPTQLayer, "run", stop_at_layer_3)
    out = tmp_path / "out"
    with pytest.raises(RunInterrupted, match="resumed"):
        Pipeline.from_recipe(recipe).run(model_folder("moe-ref-q3"), out)
    stop_at_layer_3.resumed = True
    resumed = Pipeline.from_recipe(recipe).run(model_folder("moe-ref-q3"), out)
    fresh = Pipeline.from_recipe(recipe).run(model_folder("moe-ref-q3"), tmp_path / "fresh")
    for key in ("expert_token_counts", "expert_usage_by_domain", "moe_layers"):
        assert resumed["calibration"][key] == fresh["calibration"][key]
    assert resumed["super_experts_detail"] == fresh["super_experts_detail"]

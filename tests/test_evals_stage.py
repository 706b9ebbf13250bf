"""The ``evaluate`` pipeline stage: original vs compressed scores, deltas, the run-dir cache, dtype round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import testbed_model_path as model_folder

from moecompress.errors import RecipeError, TaskError
from moecompress.evals import EvaluateStage, evaluate_model
from moecompress.pipeline import STAGE_REGISTRY, RunContext

TASKS = ["tb_arith", "tb_ppl_arithmetic"]
LIMIT = 4


@pytest.fixture(scope="module")
def compressed(testbed):
    """The Mixtral test-bed model in bf16 (as a pipeline holds it) with expert 0 of every MoE layer zeroed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_folder("moe-ref-mx")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, experts_implementation="eager").eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.down_proj[0].zero_()
    return model, AutoTokenizer.from_pretrained(path)


def test_stage_is_registered_and_validates_options():
    assert STAGE_REGISTRY["evaluate"] is EvaluateStage
    assert EvaluateStage({"tasks": "tb_arith, tb_kjv_next"}).options.tasks == ["tb_arith", "tb_kjv_next"]
    with pytest.raises(Exception, match="tasks"):
        EvaluateStage({"tasks": []})
    with pytest.raises(Exception, match="unknown key .unknown_option."):
        EvaluateStage({"tasks": ["tb_arith"], "unknown_option": 1})
    with pytest.raises(Exception, match="limit"):
        EvaluateStage({"tasks": ["tb_arith"], "limit": -3})


def test_before_after_delta_and_cache(compressed, testbed, tmp_path, monkeypatch):
    model, tokenizer = compressed
    weights_before_stage = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    context = RunContext(model=model, tokenizer=tokenizer, source=str(model_folder("moe-ref-mx")), output_dir=tmp_path)
    stage = EvaluateStage({"tasks": TASKS, "limit": LIMIT, "batch_size": 8})
    result = stage.run(context)
    before, after, delta = (result.metrics[key] for key in ("before", "after", "delta"))

    # before: the original checkpoint in fp32; after: the edited model, scored in fp32
    from moecompress.evals.loading import load_model_for_eval

    original, original_tokenizer = load_model_for_eval(model_folder("moe-ref-mx"))
    assert before == evaluate_model(original, original_tokenizer, TASKS, limit=LIMIT, batch_size=8)
    assert after == evaluate_model(copy.deepcopy(model).float(), tokenizer, TASKS, limit=LIMIT, batch_size=8)
    for task, metrics in before.items():
        for metric, value in metrics.items():
            assert delta[task][metric] == pytest.approx(after[task][metric] - value)
    assert delta["tb_ppl_arithmetic"]["bits_per_byte"] > 0  # removing an expert everywhere costs quality

    # the compressed model is left exactly as it was: bf16, same values
    assert all(parameter.dtype == torch.bfloat16 for parameter in model.parameters())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights_before_stage[name]), name

    # resumed run: the original's scores come from the run dir, the checkpoint is not loaded again
    cache_files = list((tmp_path / "eval_cache").glob("original-*.json"))
    assert len(cache_files) == 1

    def refuse_loading(*args, **kwargs):
        raise AssertionError("the original model must not be loaded again")

    monkeypatch.setattr("moecompress.evals.loading.load_model_for_eval", refuse_loading)
    assert EvaluateStage({"tasks": TASKS, "limit": LIMIT, "batch_size": 4}).run(context).metrics["before"] == before
    # other tasks or limits are other scores: the key changes
    assert EvaluateStage({"tasks": TASKS, "limit": LIMIT + 1}).cache_key(context.source) != stage.cache_key(context.source)
    assert EvaluateStage({"tasks": TASKS[:1], "limit": LIMIT}).cache_key(context.source) != stage.cache_key(context.source)


def test_bad_task_fails_before_any_model_work(compressed, tmp_path, monkeypatch):
    model, tokenizer = compressed

    def refuse_loading(*args, **kwargs):
        raise AssertionError("no model should be loaded for a bad task")

    monkeypatch.setattr("moecompress.evals.loading.load_model_for_eval", refuse_loading)
    context = RunContext(model=model, tokenizer=tokenizer, source="unused", output_dir=tmp_path)
    with pytest.raises(TaskError, match="does not exist"):
        EvaluateStage({"tasks": ["my_task"], "include_path": str(tmp_path / "missing")}).run(context)
    with pytest.raises(RecipeError, match="tokenizer"):
        EvaluateStage({"tasks": ["tb_arith"]}).run(RunContext(model=model, tokenizer=None, source="x", output_dir=tmp_path))

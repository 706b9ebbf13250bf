"""moecompress.evals: task definitions and data checks, in-process lm-eval scoring checked against a direct HF forward.

The independent scorer here follows the test bed's reference: ``[<|endoftext|>] + context ids + choice ids`` (context
and choice tokenized apart), summed choice log-probability; ``acc_mutual_info`` subtracts the choice's
log-probability after ``<|endoftext|>`` alone; perplexity chunks are scored after ``<|endoftext|>``.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import testbed_model_path as model_folder

from moecompress.errors import TaskError
from moecompress.evals import bundled_task_names, evaluate_model, resolve_tasks, run_lm_eval
from moecompress.evals.lm import build_lm
from moecompress.evals.taskdefs import BUNDLED_TASK_DIR, local_task_config

BOS_ID = 0


@pytest.fixture(scope="module")
def mixtral(testbed):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_folder("moe-ref-mx")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def continuation_logprob(model, prefix_ids: list[int], continuation_ids: list[int]) -> float:
    log_probs = model(torch.tensor([prefix_ids + continuation_ids])).logits.float().log_softmax(-1)[0]
    return sum(log_probs[len(prefix_ids) - 1 + offset, token].item() for offset, token in enumerate(continuation_ids))


def read_jsonl(path: Path, count: int) -> list[dict]:
    with path.open() as handle:
        return [json.loads(line) for _, line in zip(range(count), handle)]


def write_mc_task(folder: Path, records: list[dict], *, name: str = "my_mc", data_name: str = "my_mc.jsonl") -> Path:
    """A user task folder: one lm-eval YAML with a data path relative to the YAML."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data_name}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
        "doc_to_target: gold\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n  - metric: acc_mutual_info\n"
    )
    with (folder / data_name).open("w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------- task definitions


def test_bundled_tasks_resolve_to_absolute_data_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # lm-eval would resolve relative data paths against the CWD
    resolved = resolve_tasks(["testbed"])
    assert sorted(resolved.names) == bundled_task_names()
    assert len(resolved.names) == 16
    for spec in resolved.specs:
        data_file = Path(spec["dataset_kwargs"]["data_files"]["test"])
        assert data_file.is_absolute() and data_file.is_file()
        assert data_file.parent == BUNDLED_TASK_DIR / "data"
        expected_type = "loglikelihood_rolling" if spec["task"].startswith("tb_ppl_") else "multiple_choice"
        assert spec["output_type"] == expected_type


def test_bundled_data_is_the_test_bed_data(testbed):
    for name in bundled_task_names():
        assert (BUNDLED_TASK_DIR / "data" / f"{name}.jsonl").read_bytes() == (testbed / "tasks" / f"{name}.jsonl").read_bytes()


def test_missing_data_file_is_a_clear_error(tmp_path):
    folder = write_mc_task(tmp_path / "tasks", [{"context": "a", "choices": [" b", " c"], "gold": 0}])
    (folder / "my_mc.jsonl").unlink()
    with pytest.raises(TaskError, match=r"data file .*my_mc\.jsonl.* does not exist"):
        resolve_tasks(["my_mc"], include_path=folder)


@pytest.mark.parametrize(
    ("bad_record", "message"),
    [
        ({"context": "a", "choices": [" b", " c"], "gold": 2}, r"gold' = 2 is out of range for 2 choices"),
        ({"context": "a", "choices": [" b", " c"], "gold": -1}, r"out of range"),
        ({"context": "a", "choices": [" b", " c"], "gold": "1"}, r"must be the index of the right choice"),
        ({"context": "a", "gold": 0}, r"missing field\(s\) choices used by doc_to_choice"),
        ({"text": "a", "choices": [" b"], "gold": 0}, r"missing field\(s\) context used by doc_to_text"),
        ({"context": "a", "choices": " b", "gold": 0}, r"'choices' must be a non-empty list of strings"),
    ],
)
def test_bad_field_is_a_clear_error(tmp_path, bad_record, message):
    good = {"context": "x", "choices": [" y", " z"], "gold": 1}
    folder = write_mc_task(tmp_path / "tasks", [good, bad_record])
    with pytest.raises(TaskError, match=message) as caught:
        resolve_tasks(["my_mc"], include_path=folder)
    assert "record 2" in str(caught.value)  # the bad record is named, not the good one


def test_invalid_json_line_is_named(tmp_path):
    folder = write_mc_task(tmp_path / "tasks", [{"context": "x", "choices": [" y"], "gold": 0}])
    with (folder / "my_mc.jsonl").open("a") as handle:
        handle.write("{not json\n")
    with pytest.raises(TaskError, match=r"line 2: not valid JSON"):
        local_task_config(folder / "my_mc.yaml")


def test_unknown_task_lists_the_bundled_ones():
    with pytest.raises(TaskError) as caught:
        resolve_tasks(["no_such_task_anywhere"])
    text = str(caught.value)
    assert "no_such_task_anywhere" in text and "tb_code_next" in text and "tb_ppl_pycode" in text
    assert "hub" in text and "--include-path" in text


def test_missing_include_folder_is_a_clear_error(tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        resolve_tasks(["tb_arith"], include_path=tmp_path / "nowhere")


def test_bos_requested_without_a_bos_token_is_an_error(mixtral):
    model, tokenizer = mixtral
    tokenizer_without_bos = copy.deepcopy(tokenizer)
    tokenizer_without_bos.bos_token = None
    with pytest.raises(TaskError, match="no BOS token"):
        build_lm(model, tokenizer_without_bos, add_bos_token=True)


# ---------------------------------------------------------------------------------------------- scoring


def test_multiple_choice_matches_an_independent_scorer_item_by_item(mixtral):
    model, tokenizer = mixtral
    item_count = 8
    results = run_lm_eval(model, tokenizer, ["tb_code_next"], limit=item_count, batch_size=8, log_samples=True)
    samples = sorted(results["samples"]["tb_code_next"], key=lambda sample: sample["doc_id"])
    documents = read_jsonl(BUNDLED_TASK_DIR / "data" / "tb_code_next.jsonl", item_count)
    correct = correct_mutual_info = 0
    for document, sample in zip(documents, samples, strict=True):
        context_ids = tokenizer.encode(document["context"], add_special_tokens=False)
        choice_ids = [tokenizer.encode(choice, add_special_tokens=False) for choice in document["choices"]]
        conditional = [continuation_logprob(model, [BOS_ID, *context_ids], ids) for ids in choice_ids]
        unconditional = [continuation_logprob(model, [BOS_ID], ids) for ids in choice_ids]
        lm_eval_logprobs = [response[0] for response in sample["filtered_resps"]]
        # lm-eval's requests: 4 conditional, then 4 context-free (acc_mutual_info)
        assert lm_eval_logprobs == pytest.approx(conditional + unconditional, abs=2e-3)
        correct += int(max(range(4), key=conditional.__getitem__) == document["gold"])
        correct_mutual_info += int(
            max(range(4), key=lambda i: conditional[i] - unconditional[i]) == document["gold"]
        )
    scores = results["results"]["tb_code_next"]
    assert scores["acc,none"] == pytest.approx(correct / item_count)
    assert scores["acc_mutual_info,none"] == pytest.approx(correct_mutual_info / item_count)


def test_perplexity_matches_an_independent_scorer(mixtral):
    model, tokenizer = mixtral
    chunk_count = 3
    scores = evaluate_model(model, tokenizer, ["tb_ppl_kjv"], limit=chunk_count, batch_size=4)["tb_ppl_kjv"]
    total_nll = total_bytes = total_words = 0.0
    for document in read_jsonl(BUNDLED_TASK_DIR / "data" / "tb_ppl_kjv.jsonl", chunk_count):
        text_ids = tokenizer.encode(document["text"], add_special_tokens=False)
        total_nll -= continuation_logprob(model, [BOS_ID], text_ids)
        total_bytes += len(document["text"].encode("utf-8"))
        total_words += len(document["text"].split())
    assert scores["bits_per_byte"] == pytest.approx(total_nll / total_bytes / math.log(2), rel=1e-4)
    assert scores["byte_perplexity"] == pytest.approx(math.exp(total_nll / total_bytes), rel=1e-4)
    assert set(scores) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}


def test_model_object_is_scored_in_memory_without_reloading(mixtral, monkeypatch):
    import transformers

    model, tokenizer = mixtral

    def refuse_loading(*args, **kwargs):
        raise AssertionError("evaluation must use the model object, not load weights from disk")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse_loading))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse_loading)
    # An in-memory edit only the object has: a zero final norm makes every logit 0, so every token costs
    # log(vocab) nats: the score must be exactly that, which a reloaded checkpoint could not give.
    flattened = copy.deepcopy(model)
    torch.nn.init.zeros_(flattened.model.norm.weight)
    scores = evaluate_model(flattened, tokenizer, ["tb_ppl_arithmetic"], limit=2, batch_size=2)["tb_ppl_arithmetic"]
    documents = read_jsonl(BUNDLED_TASK_DIR / "data" / "tb_ppl_arithmetic.jsonl", 2)
    token_count = sum(len(tokenizer.encode(d["text"], add_special_tokens=False)) for d in documents)
    byte_count = sum(len(d["text"].encode("utf-8")) for d in documents)
    vocab_size = flattened.config.vocab_size
    assert scores["bits_per_byte"] == pytest.approx(token_count * math.log2(vocab_size) / byte_count, rel=1e-5)


def test_user_task_folder_is_scored(mixtral, tmp_path):
    model, tokenizer = mixtral
    documents = read_jsonl(BUNDLED_TASK_DIR / "data" / "tb_arith.jsonl", 4)
    records = [{"context": d["context"], "choices": d["choices"], "gold": d["gold"]} for d in documents]
    folder = write_mc_task(tmp_path / "my tasks", records, name="my_arith", data_name="data.jsonl")
    scores = evaluate_model(model, tokenizer, ["my_arith"], include_path=folder, batch_size=8)["my_arith"]
    expected_correct = 0
    for record in records:
        context_ids = [BOS_ID, *tokenizer.encode(record["context"], add_special_tokens=False)]
        conditional = [
            continuation_logprob(model, context_ids, tokenizer.encode(choice, add_special_tokens=False))
            for choice in record["choices"]
        ]
        expected_correct += int(max(range(len(conditional)), key=conditional.__getitem__) == record["gold"])
    assert scores["acc"] == pytest.approx(expected_correct / len(records))
    assert set(scores) == {"acc", "acc_mutual_info"}


def test_cli_json_output(testbed, capsys):
    from moecompress.cli import main

    exit_code = main(["eval", str(model_folder("moe-ref-mx")), "--tasks", "tb_arith", "--limit", "4", "--json"])
    assert exit_code == 0
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {"tb_arith"}
    assert {"acc", "acc_norm", "acc_mutual_info"} <= set(scores["tb_arith"])
    assert all(0.0 <= value <= 1.0 for value in scores["tb_arith"].values())


def test_cli_bad_task_folder_exits_with_a_message(testbed, capsys):
    from moecompress.cli import main

    exit_code = main(["eval", str(model_folder("moe-ref-mx")), "--tasks", "x", "--include-path", "/nonexistent/dir"])
    assert exit_code == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_full_code_next_agrees_with_the_test_bed_reference(mixtral, testbed):
    model, tokenizer = mixtral
    reference = json.loads((testbed / "reference_scores_moe-ref-mx.json").read_text())["tb_code_next"]
    scores = evaluate_model(model, tokenizer, ["tb_code_next"], batch_size=32)["tb_code_next"]
    assert scores["acc"] == pytest.approx(reference["acc"], abs=0.03)
    assert scores["acc_mutual_info"] == pytest.approx(reference["acc_mutual_info"], abs=0.03)

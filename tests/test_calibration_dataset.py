"""Calibration data by dataset name (issue 25): a local folder in the datasets layout (offline), the text field
named by ``text_field``, chat datasets rendered with the tokenizer's chat template as llm-compressor does."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from conftest import testbed_model_path as model_folder
from transformers import AutoTokenizer

import moecompress
from moecompress.calibration.data import Document, load_calibration, sample_sequences
from moecompress.errors import CalibrationError, RecipeError
from moecompress.recipe import parse_recipe

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(model_folder("moe-ref-q3"))


@pytest.fixture(scope="module")
def code_rows(testbed):
    with open(testbed / "calib" / "pycode.jsonl") as handle:
        texts = [json.loads(line)["text"] for line in handle][:6]
    return [{"content": text, "domain": "pycode", "id": index} for index, text in enumerate(texts)]


def parquet_folder(tmp_path, rows):
    """The hub's layout of a converted dataset: ``data/train-00000-of-00001.parquet``."""
    folder = tmp_path / "code-ds"
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


def test_a_local_dataset_folder_with_a_named_text_field(tmp_path, tokenizer, code_rows):
    folder = parquet_folder(tmp_path, code_rows)
    calibration = load_calibration(tokenizer, dataset=str(folder), text_field="content", num_samples=4, seq_len=64)
    direct = sample_sequences([Document(row["content"], "pycode") for row in code_rows], tokenizer, num_samples=4,
                              seq_len=64)
    assert torch.equal(calibration.input_ids, direct.input_ids)
    assert calibration.domains == ["pycode"] * 4  # the rows' domain field
    assert calibration.sources == [f"{folder}:train[content]"]
    with pytest.raises(CalibrationError, match=r"has no `text` or chat messages field \(fields: content, domain, id\)"):
        load_calibration(tokenizer, dataset=str(folder), num_samples=4, seq_len=64)
    with pytest.raises(CalibrationError, match="has no field 'body'.*set calibration.text_field"):
        load_calibration(tokenizer, dataset=str(folder), text_field="body", num_samples=4, seq_len=64)


def test_a_chat_dataset_is_rendered_with_the_chat_template(tmp_path, tokenizer, code_rows):
    conversations = [[{"role": "user", "content": "Explain this code."}, {"role": "assistant", "content": row["content"]}]
                     for row in code_rows]
    folder = tmp_path / "chat-ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"messages": m} for m in conversations])}).save_to_disk(
        str(folder))
    with pytest.raises(CalibrationError, match="has no chat template; set calibration.chat_template: false"):
        load_calibration(tokenizer, dataset=str(folder), num_samples=2, seq_len=32)
    templated = AutoTokenizer.from_pretrained(model_folder("moe-ref-q3"))
    templated.chat_template = CHAT_TEMPLATE
    calibration = load_calibration(templated, dataset=str(folder), num_samples=2, seq_len=32)
    rendered = [templated.apply_chat_template(messages, tokenize=False) for messages in conversations]
    assert rendered[0].startswith("<|user|>\nExplain this code.\n<|assistant|>\n")
    direct = sample_sequences([Document(text, str(folder)) for text in rendered], templated, num_samples=2, seq_len=32)
    assert torch.equal(calibration.input_ids, direct.input_ids)
    plain = load_calibration(tokenizer, dataset=str(folder), chat_template=False, num_samples=2, seq_len=32)
    joined = [f"user: Explain this code.\nassistant: {row['content']}" for row in code_rows]
    assert torch.equal(plain.input_ids, sample_sequences([Document(text, str(folder)) for text in joined], tokenizer,
                                                         num_samples=2, seq_len=32).input_ids)


def test_a_recipe_names_a_dataset_folder_beside_it(tmp_path, code_rows):
    folder = parquet_folder(tmp_path, code_rows)
    recipe = parse_recipe({"calibration": {"dataset": "code-ds", "text_field": "content", "num_samples": 4,
                                           "seq_len": 64}, "stages": []}, base_dir=tmp_path)
    assert recipe.calibration.dataset == str(folder.resolve())
    with pytest.raises(RecipeError, match="`text_field` and `chat_template` apply to a `dataset`"):
        parse_recipe({"calibration": {"files": ["bundled"], "text_field": "content"}, "stages": []})
    report = moecompress.compress(model_folder("moe-ref-q3"), {"stages": []}, tmp_path / "out", progress=False,
                                  calibration={"dataset": str(folder), "text_field": "content", "num_samples": 4,
                                               "seq_len": 64})
    assert report["calibration"]["files"] == [f"{folder}:train[content]"] and report["calibration"]["num_samples"] == 4


def test_a_hub_dataset_offline_is_refused_before_any_work(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(CalibrationError, match="cannot download dataset 'someone/corpus': offline mode is on"):
        load_calibration(tokenizer, dataset="someone/corpus", num_samples=2, seq_len=16)

"""Calibration data loading and the layer-by-layer runner (lazy checkpoint path and in-memory path)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import testbed_model_path as model_folder

from moecompress.calibration import LayerwiseRunner, load_calibration, read_documents, token_ids_sha256
from moecompress.checkpoint.lazy import LazyCheckpoint, fuse_expert_tensors
from moecompress.errors import CalibrationError, CheckpointError


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_folder("moe-ref-q3"))


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


# ----- data ----------------------------------------------------------------------------------------------------
def test_samples_are_seeded_prefixed_and_domain_balanced(tokenizer, testbed):
    first = load_calibration(tokenizer, files=[testbed / "calib"], num_samples=16, seq_len=40, seed=7)
    again = load_calibration(tokenizer, files=[testbed / "calib"], num_samples=16, seq_len=40, seed=7)
    other = load_calibration(tokenizer, files=[testbed / "calib"], num_samples=16, seq_len=40, seed=8)
    assert first.input_ids.shape == (16, 40)
    assert torch.equal(first.input_ids, again.input_ids) and first.sha256 == again.sha256
    assert not torch.equal(first.input_ids, other.input_ids) and first.sha256 != other.sha256
    assert (first.input_ids[:, 0] == 0).all()  # <|endoftext|> = id 0 starts every sample
    # 8 domains, round-robin: every domain twice
    assert sorted(set(first.domains)) == sorted(p.stem for p in (testbed / "calib").glob("*.jsonl"))
    assert all(first.domains.count(d) == 2 for d in set(first.domains))
    assert first.sha256 == token_ids_sha256(first.input_ids.clone())


def test_sample_text_comes_from_its_domain(tokenizer, testbed):
    calibration = load_calibration(tokenizer, files=[testbed / "calib" / "arithmetic.jsonl"], num_samples=3, seq_len=30)
    assert calibration.domains == ["arithmetic"] * 3
    text = tokenizer.decode(calibration.input_ids[0, 1:])
    corpus = "\n".join(json.loads(line)["text"] for line in (testbed / "calib" / "arithmetic.jsonl").open())
    assert text.replace("<|endoftext|>", "\n").split("\n")[1] in corpus


def test_txt_files_and_bundled_set(tokenizer, tmp_path):
    (tmp_path / "notes.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    calibration = load_calibration(tokenizer, files=[tmp_path / "notes.txt"], num_samples=2, seq_len=16)
    assert calibration.domains == ["notes", "notes"]
    bundled = load_calibration(tokenizer, num_samples=4, seq_len=16)
    assert bundled.num_samples == 4 and bundled.sources


def test_bad_calibration_inputs_name_the_problem(tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CalibrationError, match="no non-empty `text`"):
        load_calibration(tokenizer, files=[empty], num_samples=2, seq_len=16)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(CalibrationError, match="empty"):
        load_calibration(tokenizer, files=[tmp_path / "empty.txt"], num_samples=2, seq_len=16)
    no_text = tmp_path / "bad.jsonl"
    no_text.write_text('{"body": "hello"}\n')
    with pytest.raises(CalibrationError, match="no string `text` field"):
        read_documents([no_text])
    with pytest.raises(CalibrationError, match="does not exist"):
        read_documents([tmp_path / "missing.jsonl"])
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "a few words"}\n')
    with pytest.raises(CalibrationError, match="lower num_samples or seq_len"):
        load_calibration(tokenizer, files=[short], num_samples=4, seq_len=64)
    with pytest.raises(CalibrationError, match="offline"):
        load_calibration(tokenizer, dataset="wikitext", num_samples=2, seq_len=16)


# ----- runner --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["moe-ref-q3", "moe-ref-mx", "moe-ref-ds"])
def test_lazy_layerwise_pass_reproduces_the_full_forward(model_name, tokenizer, testbed):
    """Layer-by-layer from safetensors (per-expert keys fused on load; Mixtral's block_sparse_moe renamed; DeepSeek's
    dense layer 0 and MLA attention) gives the same last hidden state and routing as transformers' full forward."""
    from transformers import AutoModelForCausalLM

    path = model_folder(model_name)
    calibration = load_calibration(tokenizer, files=[testbed / "calib"], num_samples=4, seq_len=32, seed=1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager")
    counts = {}
    for layer_index, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(layer.mlp, "experts"):
            counts[layer_index] = torch.zeros(layer.mlp.experts.num_experts, dtype=torch.long)

            def count_hook(module, args, output, index=layer_index):
                counts[index].add_(torch.bincount(output[2].reshape(-1), minlength=len(counts[index])))

            gate.register_forward_hook(count_hook)
    with torch.no_grad():
        reference = model(calibration.input_ids, output_hidden_states=True, use_cache=False).hidden_states
    run = LayerwiseRunner.from_source(path, dtype=torch.float32).run(
        calibration, ["expert_token_counts"], batch_size=2, return_hidden_states=True)
    last = torch.cat(run.final_hidden_states)
    # hidden_states[-1] has the final norm applied; compare before it
    final_norm = model.model.norm
    assert torch.allclose(final_norm(last), reference[-1], atol=1e-4, rtol=1e-4)
    assert sorted(run.layers) == sorted(counts)
    for layer_index, expected in counts.items():
        assert torch.equal(run.layers[layer_index]["expert_token_counts"], expected)
    assert run.num_hidden_layers == len(model.model.layers)


def test_in_memory_model_pass_matches_lazy_pass_and_leaves_the_model_intact(tokenizer, testbed):
    from transformers import AutoModelForCausalLM

    path = model_folder("moe-ref-mx")
    calibration = load_calibration(tokenizer, files=[testbed / "calib"], num_samples=4, seq_len=32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager")
    with torch.no_grad():
        before = model(calibration.input_ids[:1]).logits
    names = ["reap_sums", "expert_token_counts", "router_logit_gram"]
    in_memory = LayerwiseRunner.from_source(model).run(calibration, names, batch_size=2)
    lazy = LayerwiseRunner.from_source(path, dtype=torch.float32).run(calibration, names, batch_size=2)
    for layer in lazy.layers:
        for name in names:
            assert torch.allclose(in_memory.layers[layer][name].double(), lazy.layers[layer][name].double(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        after = model(calibration.input_ids[:1]).logits
    assert torch.equal(before, after)
    assert model.config._experts_implementation == "eager"


def test_fuse_matches_transformers_loading():
    checkpoint = LazyCheckpoint(model_folder("moe-ref-q3"))
    prefix = "model.layers.2.mlp.experts."
    fused = fuse_expert_tensors({key[len("model.layers.2.mlp."):]: checkpoint.read(key) for key in checkpoint.keys_under(prefix)})
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_folder("moe-ref-q3"), experts_implementation="eager")
    experts = model.model.layers[2].mlp.experts
    assert torch.equal(fused["experts.gate_up_proj"], experts.gate_up_proj.data)
    assert torch.equal(fused["experts.down_proj"], experts.down_proj.data)
    with pytest.raises(CheckpointError, match="incomplete"):
        fuse_expert_tensors({"experts.0.gate_proj.weight": torch.zeros(2, 2), "experts.0.up_proj.weight": torch.zeros(2, 2)})


def test_unknown_statistic_is_rejected(testbed, tokenizer):
    calibration = load_calibration(tokenizer, files=[testbed / "calib"], num_samples=1, seq_len=8)
    with pytest.raises(CalibrationError, match="unknown calibration statistic"):
        LayerwiseRunner.from_source(model_folder("moe-ref-q3")).run(calibration, ["router_logit_means"])


def test_statistics_after_a_merge_that_kept_the_full_router(tokenizer, testbed):
    """Router statistics stay per router output; expert statistics follow the stored (merged) experts, and the
    pass still reproduces the merged model's own forward."""
    from transformers import AutoModelForCausalLM

    from moecompress.models.edits import merge_experts

    model = AutoModelForCausalLM.from_pretrained(model_folder("moe-ref-mx"), dtype=torch.float32, experts_implementation="eager")
    merge_experts(model, {1: [[0, 1], [2, 3], [4], [5], [6], [7]]}, router_rule="remap")
    calibration = load_calibration(tokenizer, files=[testbed / "calib"], num_samples=2, seq_len=32)
    with torch.no_grad():
        reference = model.model(calibration.input_ids, use_cache=False).last_hidden_state
    run = LayerwiseRunner.from_source(model).run(
        calibration, ["router_logit_gram", "expert_token_counts", "reap_sums", "routing_weight_sums_raw"],
        batch_size=2, return_hidden_states=True)
    assert torch.allclose(model.model.norm(run.final_hidden_states[0]), reference, atol=1e-4, rtol=1e-4)
    merged = run.layers[1]
    assert merged["router_logit_gram"].shape == (8, 8)
    assert merged["expert_token_counts"].shape == (6,) and merged["reap_sums"].shape == (6,)
    assert int(merged["expert_token_counts"].sum()) == 2 * 2 * 32  # top-2 picks, merged ids may repeat per token

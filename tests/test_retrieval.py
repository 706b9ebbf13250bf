"""PreMoe TAER (moecompress.pruning.retrieval): pattern store, prompt query, selective reduced-model building, swaps.

References: the store's TCESS equals the markers computed from a plain transformers forward with router hooks; the
query equals the full model's router logits at the key layer; the reduced model equals the full model with the
dropped experts' router logits at -inf; bytes read equal exactly the non-expert tensors plus the kept experts'
tensors, counted from the safetensors headers.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import conftest
import pytest
import torch
import transformers
from test_edits_reference import routers_with_pruned_logits

from moecompress.calibration import load_calibration, tcess_markers
from moecompress.checkpoint import load_model
from moecompress.checkpoint.fingerprint import routing_fingerprint
from moecompress.checkpoint.partial import AssemblySources, CountingCheckpoint, build_reduced_model
from moecompress.models import find_moe_blocks
from moecompress.pruning.retrieval import (
    PatternStore,
    PromptScorer,
    RetrievalError,
    RetrievedModel,
    TcessOptions,
    build_pattern_store,
    select_kept_experts,
)

Q3 = conftest.TESTBED / "models" / "moe-ref-q3"
CALIB = conftest.TESTBED / "calib"
TASKS = {"code": [str(CALIB / "pycode.jsonl")], "prose": [str(CALIB / "austen.jsonl")],
         "arith": [str(CALIB / "arithmetic.jsonl")]}
CODE_PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    for name in argv[1:]:\n        print(os.path.basename(name))\n"
PROSE_PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife."
_EXPERT_KEY = re.compile(r"\.experts\.(\d+)\.")


@pytest.fixture(scope="module")
def store(testbed):
    torch.set_num_threads(1)
    return build_pattern_store(Q3, TASKS, num_samples=4, seq_len=64, dtype=torch.float32)


@pytest.fixture(scope="module")
def full_q3(testbed):
    model, tokenizer = load_model(Q3, dtype=torch.float32)
    return model, tokenizer


def tensor_bytes(folder: Path) -> dict[str, int]:
    """Stored bytes of every tensor of a checkpoint, from the safetensors headers."""
    sizes = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        sizes.update({key: entry["data_offsets"][1] - entry["data_offsets"][0]
                      for key, entry in header.items() if key != "__metadata__"})
    return sizes


def expected_build_bytes(folder: Path, kept: dict[int, list[int]]) -> int:
    """Every non-expert tensor once, plus the kept experts' tensors (keys ``model.layers.L.mlp.experts.E.*``)."""
    total = 0
    for key, size in tensor_bytes(folder).items():
        match = _EXPERT_KEY.search(key)
        if match is None:
            total += size
        elif int(match.group(1)) in kept[int(key.split(".")[2])]:
            total += size
    return total


def direct_tcess(model, input_ids: torch.Tensor, options: TcessOptions) -> dict[int, torch.Tensor]:
    """TCESS per MoE layer from one plain forward: router inputs hooked, fp32 logits, markers averaged over tokens."""
    sums, handles = {}, []
    for view in find_moe_blocks(model):
        def hook(module, args, view=view):
            hidden = args[0].reshape(-1, view.hidden_size).float()
            logits = hidden @ view.router_weight.float().T
            sums.setdefault(view.layer_index, []).append(tcess_markers(logits, options.top_k or view.routing.top_k,
                                                                       options.threshold, options.phi))
        handles.append(view.router.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids)
    for handle in handles:
        handle.remove()
    return {layer: torch.cat(markers).mean(0) for layer, markers in sums.items()}


# ----- store ----------------------------------------------------------------------------------------------------------
def test_store_patterns_are_the_tcess_of_each_task_text(store, full_q3, one_thread):
    model, tokenizer = full_q3
    assert store.task_names == ["code", "prose", "arith"] and store.moe_layers == list(range(6))
    assert store.key_layers == [0] and store.tcess == TcessOptions.preset("recommended")
    for task in ("code", "arith"):
        calibration = load_calibration(tokenizer, files=TASKS[task], num_samples=4, seq_len=64, seed=0)
        reference = direct_tcess(model, calibration.input_ids, store.tcess)
        assert store.patterns[task].shape == (6, 32)
        for row, layer in enumerate(store.moe_layers):
            torch.testing.assert_close(store.patterns[task][row], reference[layer], rtol=1e-4, atol=1e-5)
        assert store.tasks[task]["calibration_sha256"] == calibration.sha256
    assert not torch.allclose(store.patterns["code"], store.patterns["arith"])  # tasks route differently
    # Super experts come from max |down_proj output| over all task passes: on these small samples the arithmetic
    # text's largest output (layer 3, expert 24: 22.4, against <= 13 elsewhere) decides.
    assert store.super_experts == [(3, 24)]


def test_store_saves_atomically_and_round_trips(store, tmp_path):
    folder = store.save(tmp_path / "store")
    loaded = PatternStore.load(folder)
    assert loaded.describe() == store.describe()
    for task in store.task_names:
        assert torch.equal(loaded.patterns[task], store.patterns[task])
    with pytest.raises(RetrievalError, match="--overwrite"):
        store.save(folder)
    store.save(folder, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no partial or old folder left behind
    with pytest.raises(RetrievalError, match="not a pattern store"):
        PatternStore.load(tmp_path)


def test_fingerprint_tells_models_apart(testbed):
    assert routing_fingerprint(Q3) == routing_fingerprint(Q3)
    assert routing_fingerprint(Q3) != routing_fingerprint(testbed / "models" / "moe-ref-mx")


def test_tcess_presets_and_bad_options():
    assert TcessOptions.preset("premoe_code").to_dict() == {"top_k": 1, "threshold": -1.0, "phi": "identity"}
    assert TcessOptions.preset("recommended").to_dict() == {"top_k": None, "threshold": 0.0, "phi": "peu"}
    with pytest.raises(RetrievalError, match="preset"):
        TcessOptions.preset("paper")
    with pytest.raises(RetrievalError, match="phi"):
        TcessOptions(phi="softmax")


# ----- query ----------------------------------------------------------------------------------------------------------
def test_query_equals_full_model_router_and_reads_no_expert(store, full_q3, one_thread):
    model, tokenizer = full_q3
    checkpoint = CountingCheckpoint(Q3)
    scorer = PromptScorer.load(AssemblySources(checkpoint), tokenizer, [0, 1], store.tcess, dtype=torch.float32)
    sizes = tensor_bytes(Q3)
    # the prefix: embeddings, all of layer 0 (its experts run: layer 1 is also a key layer), layer 1 but its experts
    expected = sum(size for key, size in sizes.items() if key.startswith(("model.embed_tokens.", "model.layers.0."))
                   or (key.startswith("model.layers.1.") and ".experts." not in key))
    assert checkpoint.bytes_read == expected
    for prompt in (CODE_PROMPT, PROSE_PROMPT):
        scores = scorer.score(prompt)
        reference = direct_tcess(model, scorer.prompt_ids(prompt), store.tcess)
        for layer in (0, 1):
            torch.testing.assert_close(scores[layer], reference[layer], rtol=1e-4, atol=1e-5)
        task, distances = store.nearest({0: scores[0]})
        patterns = torch.stack([store.patterns[t][0] for t in store.task_names])
        direct = torch.linalg.vector_norm(patterns - reference[0], dim=1)
        assert task == store.task_names[int(direct.argmin())]
        assert distances[task] == pytest.approx(float(direct.min()), rel=1e-4)
    assert store.nearest({0: scorer.score(CODE_PROMPT)[0]})[0] == "code"
    assert store.nearest({0: scorer.score(PROSE_PROMPT)[0]})[0] == "prose"
    with pytest.raises(RetrievalError, match="empty"):
        scorer.score("")


def test_several_key_layers_are_normalised_and_concatenated(store):
    query = {0: store.patterns["prose"][0] * 3.0, 1: store.patterns["prose"][1] * 0.5}
    task, distances = store.nearest(query)  # scale-free per layer: the prose pattern itself is at distance 0
    assert task == "prose" and distances["prose"] == pytest.approx(0.0, abs=1e-6)


# ----- reduced model --------------------------------------------------------------------------------------------------
def test_select_kept_experts_keeps_super_experts_then_top_tcess():
    pattern = torch.tensor([[0.1, 0.9, 0.5, 0.5], [0.4, 0.3, 0.2, 0.1]])
    assert select_kept_experts(pattern, [0, 1], 2) == {0: [1, 2], 1: [0, 1]}  # tie 0.5/0.5: lower id
    assert select_kept_experts(pattern, [0, 1], 2, [(1, 3)]) == {0: [1, 2], 1: [0, 3]}
    with pytest.raises(RetrievalError, match="super experts"):
        select_kept_experts(pattern, [0, 1], 1, [(1, 3), (1, 2)])
    with pytest.raises(RetrievalError, match="between 1 and 4"):
        select_kept_experts(pattern, [0, 1], 5)


@pytest.mark.parametrize("name", conftest.TESTBED_MODELS)
def test_reduced_model_reads_only_kept_experts_and_equals_masked_reference(name, testbed, one_thread):
    folder = testbed / "models" / name
    model, tokenizer = load_model(folder, dtype=torch.float32)
    views = find_moe_blocks(model)
    num_experts = views[0].num_experts
    generator = torch.Generator().manual_seed(1)
    keep = num_experts // 2
    kept = {view.layer_index: sorted(torch.randperm(num_experts, generator=generator)[:keep].tolist()) for view in views}
    checkpoint = CountingCheckpoint(folder)
    reduced, counts = build_reduced_model(AssemblySources(checkpoint), kept, dtype=torch.float32)
    assert checkpoint.bytes_read == expected_build_bytes(folder, kept)
    assert checkpoint.bytes_read < checkpoint.total_bytes == sum(tensor_bytes(folder).values())
    assert counts == {"experts_read": keep * len(views), "experts_from_memory": 0}
    group_state = {v.layer_index: (v.router.num_group, v.router.topk_group)
                   for v in find_moe_blocks(reduced) if hasattr(v.router, "num_group")}
    pruned = {layer: sorted(set(range(num_experts)) - set(ids)) for layer, ids in kept.items()}
    tokens = torch.tensor([tokenizer("def add(a, b):\n    return a + b  # It is a truth")["input_ids"]])
    with routers_with_pruned_logits(model, pruned, group_state or None), torch.no_grad():
        reference = model(tokens).logits
    with torch.no_grad():
        torch.testing.assert_close(reduced(tokens).logits, reference, rtol=1e-5, atol=1e-5)
    assert [view.num_experts for view in find_moe_blocks(reduced)] == [keep] * len(views)


def test_retrieved_model_swaps_reading_only_the_experts_it_lacks(store, testbed, one_thread):
    retrieved = RetrievedModel(Q3, store, num_experts_to_keep=8, dtype=torch.float32)
    first = retrieved.for_prompt(CODE_PROMPT)
    assert first.task == "code" and first.query_bytes > 0 and first.experts_read == 8 * 6
    assert first.query_bytes + first.build_bytes == retrieved.bytes_read
    assert 24 in first.kept_experts[3]  # the super expert stays whatever its TCESS
    code_experts = first.kept_experts
    second = retrieved.for_prompt(PROSE_PROMPT)
    assert second.task == "prose" and retrieved.task == "prose"
    missing = {layer: set(kept) - set(code_experts[layer]) for layer, kept in second.kept_experts.items()}
    expert_size = 3 * 80 * 256 * 2  # gate, up, down of one expert (bf16 on disk)
    assert second.build_bytes == expert_size * sum(len(ids) for ids in missing.values())
    assert second.experts_read == sum(len(ids) for ids in missing.values())
    assert second.experts_from_memory == 8 * 6 - second.experts_read
    fresh, _ = build_reduced_model(AssemblySources(CountingCheckpoint(Q3)), second.kept_experts, dtype=torch.float32)
    swapped_state, fresh_state = retrieved.model.state_dict(), fresh.state_dict()
    assert swapped_state.keys() == fresh_state.keys()
    for key in fresh_state:
        assert torch.equal(swapped_state[key], fresh_state[key]), key
    again = retrieved.for_prompt(PROSE_PROMPT)  # same task: nothing is rebuilt or read but the query's hook
    assert again.build_bytes == 0 and again.query_bytes == 0
    with pytest.raises(RetrievalError, match="no task"):
        retrieved.use_task("poetry")


# ----- command line ---------------------------------------------------------------------------------------------------
def _cli(argv, capsys):
    from moecompress.cli import main

    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_store_build_show_and_retrieve_saves_a_plain_model(store, testbed, tmp_path, capsys, one_thread):
    code, out, err = _cli(["store", "build", Q3, "--tasks", f"code={CALIB / 'pycode.jsonl'}",
                           f"arith={CALIB / 'arithmetic.jsonl'}", "--num-samples", "2", "--seq-len", "32",
                           "--preset", "premoe_code", "--out", tmp_path / "store"], capsys)
    assert code == 0, err
    code, out, err = _cli(["store", "show", tmp_path / "store", "--json"], capsys)
    record = json.loads(out)
    assert code == 0 and list(record["tasks"]) == ["code", "arith"] and record["tcess"]["phi"] == "identity"
    store.save(tmp_path / "full_store")
    code, out, err = _cli(["retrieve", Q3, "--store", tmp_path / "full_store", "--prompt", CODE_PROMPT, "--keep", "16",
                           "--out", tmp_path / "reduced", "--dtype", "float32", "--json"], capsys)
    assert code == 0, err
    record = json.loads(out)
    assert record["task"] == "code" and record == json.loads((tmp_path / "reduced" / "retrieval.json").read_text())
    kept = {int(layer): ids for layer, ids in record["kept_experts"].items()}
    assert record["bytes_read"]["total"] == expected_build_bytes(Q3, kept)  # query + build: each tensor read once
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "reduced", dtype=torch.float32,
                                                                  experts_implementation="eager").eval()
    fresh, _ = build_reduced_model(AssemblySources(CountingCheckpoint(Q3)), kept, dtype=torch.float32)
    tokens = torch.tensor([[0, 5, 17, 300, 41, 9, 2000, 33]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, fresh(tokens).logits, rtol=0, atol=0)
    code, out, err = _cli(["retrieve", Q3, "--store", tmp_path / "full_store", "--prompt", PROSE_PROMPT], capsys)
    assert code == 0 and "task pattern: prose" in out and "% of the checkpoint" in out


@pytest.mark.parametrize("argv, message", [
    (["store", "build", Q3, "--tasks", "code", "--out", "{tmp}/s"], "NAME=FILE"),
    (["store", "build", Q3, "--tasks", "code={tmp}/none.jsonl", "--out", "{tmp}/s"], "does not exist"),
    (["retrieve", Q3, "--store", "{tmp}", "--prompt", "x"], "not a pattern store"),
    (["retrieve", Q3, "--store", "{store}", "--prompt", "x", "--keep", "40"], "between 1 and 32"),
    (["retrieve", Q3, "--store", "{store}"], "--prompt"),
    (["retrieve", Q3, "--store", "{store}", "--prompt", "x", "--out", f"{Q3}/sub"], "input model folder"),
    (["store", "build", Q3, "--tasks", f"code={CALIB / 'pycode.jsonl'}", "--out", f"{Q3}/store"], "input model folder"),
    (["store", "build", Q3, "--tasks", f"code={CALIB / 'pycode.jsonl'}", "--out", "{store}"], "--overwrite"),
    (["store", "build", Q3, "--tasks", "a=x.jsonl", "a=y.jsonl", "--out", "{tmp}/s"], "twice"),
    (["retrieve", Q3, "--store", "{store}", "--prompt", "x", "--key-layers", "7"], "not an MoE layer"),
    (["retrieve", conftest.TESTBED / "models" / "moe-ref-mx", "--store", "{store}", "--prompt", "x"], "another model"),
])
def test_cli_errors_are_one_line(argv, message, store, tmp_path, capsys):
    store.save(tmp_path / "store")
    argv = [str(arg).replace("{tmp}", str(tmp_path)).replace("{store}", str(tmp_path / "store")) for arg in argv]
    code, out, err = _cli(argv, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err

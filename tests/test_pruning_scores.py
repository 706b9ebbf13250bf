"""Pruning scores against direct computations: REAP / EAN / frequency from a hooked HF forward, TCESS from its
formula on hand-made logits, and the kept sets the stages choose from those scores."""

from __future__ import annotations

import pytest
import torch
from conftest import testbed_model_path as model_folder
from torch.nn import functional as F

import moecompress.analysis.block_outputs  # noqa: F401  (registers moe_block_inputs)
from moecompress.analysis.expert_scores import (
    ean_scores,
    frequency_scores,
    reap_frequency_weighted_scores,
    reap_scores,
    reap_balance_aware_scores,
    routing_is_balanced,
    tcess_scores,
    usage_shares,
)
from moecompress.calibration import collect_statistics
from moecompress.calibration.statistics import tcess_markers
from moecompress.checkpoint import load_model
from moecompress.models import find_moe_blocks
from moecompress.pipeline import RunContext
from moecompress.pruning.ean import EanPruning
from moecompress.pruning.frequency import FrequencyPruning
from moecompress.pruning.premoe import PremoeOptions, PremoePruning
from moecompress.pruning.reap import ReapPruning

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def q3_model_and_tokens(testbed):
    model, _ = load_model(str(model_folder("moe-ref-q3")), dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 8192, (4, 24), generator=generator)
    tokens[:, 0] = 0
    return model, tokens


def _hooked_reference(model, tokens):
    """Per MoE layer ``(counts [E], ean [E], reap [E])`` from an HF forward: the experts module's inputs, top-k
    indices and combine weights are captured, and expert outputs recomputed from the fused HF tensors."""
    captured = {}
    handles = []
    for view in find_moe_blocks(model):
        def hook(module, args, kwargs, output, layer=view.layer_index):
            hidden, index, weights = (list(args) + [kwargs.get(k) for k in ("top_k_index", "top_k_weights")])[:3]
            captured.setdefault(layer, []).append((module, hidden.detach(), index.detach(), weights.detach().float()))
        handles.append(view.experts.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(tokens)
    for handle in handles:
        handle.remove()
    reference = {}
    torch.set_grad_enabled(False)
    for layer, batches in captured.items():
        module = batches[0][0]
        num_experts = module.gate_up_proj.shape[0]
        counts = torch.zeros(num_experts, dtype=torch.float64)
        ean = torch.zeros(num_experts, dtype=torch.float64)
        reap = torch.zeros(num_experts, dtype=torch.float64)
        for _, hidden, index, weights in batches:
            for token in range(hidden.shape[0]):
                for slot in range(index.shape[1]):
                    expert = int(index[token, slot])
                    gate, up = F.linear(hidden[token], module.gate_up_proj[expert]).chunk(2)
                    norm = float(F.linear(F.silu(gate) * up, module.down_proj[expert]).norm())
                    counts[expert] += 1
                    ean[expert] += norm
                    reap[expert] += float(weights[token, slot]) * norm
        reference[layer] = (counts, ean, torch.where(counts > 0, reap / counts.clamp_min(1), torch.zeros_like(reap)))
    torch.set_grad_enabled(True)
    return reference


def test_frequency_ean_and_reap_scores_match_a_hooked_hf_forward(q3_model_and_tokens):
    model, tokens = q3_model_and_tokens
    statistics = collect_statistics(model, tokens, ["expert_token_counts", "ean_sums", "reap_sums"], batch_size=2)
    reference = _hooked_reference(model, tokens)
    assert sorted(statistics) == sorted(reference)
    for layer, (counts, ean, reap) in reference.items():
        torch.testing.assert_close(frequency_scores(statistics[layer]).double(), counts)
        torch.testing.assert_close(ean_scores(statistics[layer]).double(), ean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(reap_scores(statistics[layer]).double(), reap, rtol=1e-4, atol=1e-5)
        assert (reap[counts == 0] == 0).all()
        torch.testing.assert_close(reap_frequency_weighted_scores(statistics[layer]).double(), reap * counts,
                                   rtol=1e-4, atol=1e-4)
        shares = counts * len(counts) / counts.sum()  # routed tokens over a uniform expert's
        balanced = bool(shares.std() <= 0.5)  # q3's layers are not (variation 0.7-0.9 on real text)
        torch.testing.assert_close(reap_balance_aware_scores(statistics[layer], 0.5).double(),
                                   reap if balanced else reap * shares, rtol=1e-4, atol=1e-5)


def test_frequency_weighted_reap_never_keeps_a_rare_expert_over_a_busy_one_unless_it_earns_it(tmp_path):
    """Layer statistics where expert 0 is busy (1000 tokens, mean g*||E|| 1.0), expert 1 rare (10 tokens, mean
    5.0: the paper's score keeps it) and expert 2 dead; the frequency-weighted score keeps the busy one, the paper's
    the rare one, and the default (balance-aware: this layer is far from balanced) ranks as the frequency-weighted."""
    counts = torch.tensor([1000.0, 10.0, 0.0, 500.0])
    sums = torch.tensor([1000.0, 50.0, 0.0, 400.0])
    statistics = {"expert_token_counts": counts, "reap_sums": sums}
    paper = ReapPruning({"num_experts_to_keep": 2, "preset": "reap_paper"})
    weighted = ReapPruning({"num_experts_to_keep": 2, "score": "frequency_weighted"})
    default = ReapPruning({"num_experts_to_keep": 2})
    assert default.options.score == "balance_aware" and paper.options.score == "mean"
    assert torch.topk(paper.layer_scores(None, statistics), 2).indices.tolist() == [1, 0]
    assert torch.topk(weighted.layer_scores(None, statistics), 2).indices.tolist() == [0, 3]
    assert torch.topk(default.layer_scores(None, statistics), 2).indices.tolist() == [0, 3]
    with pytest.raises(ValueError, match="preset 'reap_paper' fixes score"):
        ReapPruning({"num_experts_to_keep": 2, "preset": "reap_paper", "score": "frequency_weighted"})


def test_balance_aware_reap_is_the_papers_mean_on_a_balanced_layer_and_frequency_weighted_elsewhere():
    """Balanced counts (variation 0.16, as DeepSeek-V3's bias makes them): the default ranks exactly as the paper's
    mean, which differs from the frequency-weighted ranking. Starved counts (variation 1.1): it is the frequency-weighted
    sum in the mean's units (mean x usage share), so a dead expert scores 0."""
    balanced = {"expert_token_counts": torch.tensor([120.0, 100.0, 80.0, 100.0]),
                "reap_sums": torch.tensor([120.0, 110.0, 96.0, 90.0])}  # means 1.0, 1.1, 1.2, 0.9
    assert routing_is_balanced(balanced["expert_token_counts"], 0.5)
    default = ReapPruning({"num_experts_to_keep": 2})
    torch.testing.assert_close(default.layer_scores(None, balanced), reap_scores(balanced))
    assert torch.topk(default.layer_scores(None, balanced), 2).indices.tolist() == [2, 1]
    assert torch.topk(reap_frequency_weighted_scores(balanced), 2).indices.tolist() == [0, 1]
    starved = {"expert_token_counts": torch.tensor([1000.0, 40.0, 0.0, 960.0]),
               "reap_sums": torch.tensor([1000.0, 100.0, 0.0, 900.0])}  # means 1, 2.5, 0, 0.94; shares 2, .08, 0, 1.92
    torch.testing.assert_close(usage_shares(starved["expert_token_counts"]),
                               torch.tensor([2.0, 0.08, 0.0, 1.92], dtype=torch.float64))
    assert not routing_is_balanced(starved["expert_token_counts"], 0.5)
    assert routing_is_balanced(starved["expert_token_counts"], 2.0)  # the threshold is an option
    torch.testing.assert_close(default.layer_scores(None, starved), torch.tensor([2.0, 0.2, 0.0, 1.8]))
    strict = ReapPruning({"num_experts_to_keep": 2, "balanced_variation": 2.0})
    torch.testing.assert_close(strict.layer_scores(None, starved), reap_scores(starved))
    with pytest.raises(ValueError, match="balanced_variation"):
        ReapPruning({"num_experts_to_keep": 2, "balanced_variation": 0.0})


def test_tcess_markers_follow_the_premoe_formula_on_hand_made_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0], [-0.5, -0.2, -4.0, 1.0]])
    # top-2 of row 0: experts 0 (2.0) and 2 (0.5); row 1: experts 3 (1.0) and 1 (-0.2)
    softmax_row0 = torch.softmax(torch.tensor([2.0, 0.5]), 0)  # [0.818, 0.182]
    identity = tcess_markers(logits, top_k=2, threshold=-1.0, phi="identity")
    torch.testing.assert_close(identity, torch.tensor([[2.0, 0, 0.5, 0], [0, -0.2, 0, 1.0]]))
    peu = tcess_markers(logits, top_k=2, threshold=0.0, phi="peu")
    sigmoid = torch.sigmoid(torch.tensor([0.5, -0.2]))  # above 0.5 and -0.2: phi takes them
    torch.testing.assert_close(peu, torch.tensor([[2.0, 0, float(sigmoid[0]), 0], [0, float(sigmoid[1]), 0, 1.0]]))
    assert (peu >= 0).all()  # max(s, sigmoid(s)) is always positive
    filtered = tcess_markers(logits, top_k=2, threshold=0.5, phi="identity")
    assert float(softmax_row0[1]) < 0.5  # expert 2's share of row 0's top-2 is below the threshold: dropped
    torch.testing.assert_close(filtered, torch.tensor([[2.0, 0, 0, 0], [0, 0, 0, 1.0]]))
    code = tcess_markers(logits, top_k=1, threshold=-1.0, phi="identity")  # the premoe_code preset
    torch.testing.assert_close(code, torch.tensor([[2.0, 0, 0, 0], [0, 0, 0, 1.0]]))


def test_premoe_options_defaults_and_preset():
    assert PremoeOptions(num_experts_to_keep=4).tcess() == {"top_k": None, "threshold": 0.0, "phi": "peu"}
    assert PremoeOptions(num_experts_to_keep=4, preset="premoe_code").tcess() == {"top_k": 1, "threshold": -1.0,
                                                                                  "phi": "identity"}
    with pytest.raises(ValueError, match="either the preset or the values"):
        PremoeOptions(num_experts_to_keep=4, preset="premoe_code", phi="peu")


def test_tcess_statistic_is_the_mean_marker_over_all_tokens(q3_model_and_tokens):
    model, tokens = q3_model_and_tokens
    options = {"tcess_markers": {"top_k": 2, "threshold": 0.0, "phi": "peu"}}
    statistics = collect_statistics(model, tokens, ["tcess_markers", "moe_block_inputs"], options=options,
                                    batch_size=4)
    for view in find_moe_blocks(model):
        inputs = statistics[view.layer_index]["moe_block_inputs"]  # every router input (fewer than max_tokens)
        assert inputs.shape[0] == tokens.numel()
        logits = F.linear(inputs, view.router_weight.float())
        expected = tcess_markers(logits, 2, 0.0, "peu").mean(0)
        torch.testing.assert_close(tcess_scores(statistics[view.layer_index]), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stage_class, options", [
    (FrequencyPruning, {}), (EanPruning, {}), (ReapPruning, {}), (PremoePruning, {"preset": "premoe_code"}),
])
def test_stages_keep_the_best_scored_experts_and_the_super_experts(q3_model_and_tokens, stage_class, options, tmp_path):
    model, tokens = q3_model_and_tokens
    import copy

    model = copy.deepcopy(model)
    context = RunContext(model=model, tokenizer=None, source="", output_dir=tmp_path, calibration=tokens,
                         super_experts=[(1, 5)], batch_size=2)
    stage = stage_class({"num_experts_to_keep": 8, **options})
    result = stage.run(context)
    scores = result.metrics["scores"]
    for layer, kept in result.decisions["kept_experts"].items():
        layer_scores = torch.tensor(scores[layer])
        assert len(kept) == 8
        protected = {5} if layer == "1" else set()
        assert protected <= set(kept)
        dropped = [e for e in range(32) if e not in kept]
        others = [e for e in kept if e not in protected]
        assert layer_scores[dropped].max() <= layer_scores[others].min()
    assert all(view.num_experts == 8 for view in find_moe_blocks(model))
    assert context.super_experts == [(1, result.decisions["kept_experts"]["1"].index(5))]
    assert (tmp_path / result.plots[0]).is_file()


def test_only_rank_zero_draws_a_pruning_plot_every_rank_names_it(tmp_path, monkeypatch):
    """Over several ranks every rank decides the same, so one file is drawn (by rank 0), not one per rank."""
    import moecompress.pruning.base as pruning_base
    from moecompress.distributed import World

    scores, kept = {0: [3.0, 1.0, 2.0]}, {0: [0, 2]}
    monkeypatch.setattr(pruning_base, "current_world", lambda: World(rank=1, size=2))
    named = pruning_base.scores_plot(scores, kept, tmp_path / "plots" / "rank1.png", title="t")
    assert named == tmp_path / "plots" / "rank1.png" and not named.exists()
    monkeypatch.setattr(pruning_base, "current_world", lambda: World(rank=0, size=2))
    drawn = pruning_base.scores_plot(scores, kept, tmp_path / "plots" / "rank0.png", title="t")
    assert drawn.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

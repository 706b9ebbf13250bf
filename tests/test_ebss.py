"""EBSS (MoEQuant): self-generated, expert-balanced calibration sequences, on the test-bed moe-ref-q3.

References: an independent beam search (full recomputation, no KV cache, every vocabulary token) for tau = inf;
numpy's unbiased std for sigma; the calibration statistics' ``expert_token_counts`` for the routing hooks; plain
greedy and sampled generation from the same first tokens for the balance claim.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pydantic
import pytest
import torch
from conftest import testbed_model_path as model_folder

from moecompress.calibration import collect_statistics, load_calibration
from moecompress.calibration.ebss import (
    EbssOptions,
    ebss_search,
    expert_usage_std,
    first_token_candidates,
    generate_ebss,
    model_fingerprint,
    per_layer_sigma,
    usage_sigma,
)
from moecompress.checkpoint import load_model
from moecompress.errors import RecipeError
from moecompress.models import keep_experts
from moecompress.recipe import parse_recipe

SEPARATOR = 0  # <|endoftext|>: BOS = EOS of the test-bed tokenizer


@pytest.fixture(scope="module")
def q3():
    torch.set_num_threads(1)
    model, tokenizer = load_model(model_folder("moe-ref-q3"), dtype=torch.float32)
    return model, tokenizer


def reference_beam_search(model, first_token: int, length: int, width: int) -> list[int]:
    """Plain beam search by cumulative log-prob: every beam re-run from scratch, every token a candidate."""
    beams, scores = [[SEPARATOR, first_token]], torch.zeros(1, dtype=torch.float64)
    with torch.no_grad():
        while len(beams[0]) < length:
            log_probs = torch.log_softmax(model(torch.tensor(beams)).logits[:, -1].double(), dim=-1)  # [beams, V]
            total = (scores[:, None] + log_probs).reshape(-1)
            best = total.topk(width).indices
            vocab = log_probs.shape[1]
            beams = [beams[int(index) // vocab] + [int(index) % vocab] for index in best]
            scores = total[best]
    return beams[0]


def test_tau_inf_is_plain_beam_search(q3):
    model, _ = q3
    options = EbssOptions(num_samples=2, seq_len=10, tau=math.inf, beam=3, top_m=8, no_repeat_ngram=0)
    first_tokens = torch.tensor([3784, 2171])
    searched = ebss_search(model, first_tokens, SEPARATOR, options, vocab_limit=8192)
    for row, first in enumerate(first_tokens.tolist()):
        assert searched[row].tolist() == reference_beam_search(model, first, 10, 3)


def _routing_counts(model, sequence: list[int]) -> torch.Tensor:
    """``[layers, experts]`` top-k selection counts of one whole sequence, from a fresh forward (no cache)."""
    from moecompress.calibration.ebss import RoutingCounter

    with RoutingCounter(model) as counter, torch.no_grad():
        counter.reset(1)
        model(torch.tensor([sequence]))
        return counter.step_counts[0]


def reference_child_balance_search(model, first_token: int, length: int, width: int, fan: int, tau: float) -> list[int]:
    """The paper's form without a cache: every beam re-run from scratch, its ``fan`` most likely extensions each
    re-run whole to count the child's routing, scored ``-(RS + log p) / (j + 1) + sigma_counts(child) / tau``."""
    beams, sums = [[SEPARATOR, first_token]], [0.0]
    with torch.no_grad():
        while len(beams[0]) < length:
            candidates = []
            for beam, total in zip(beams, sums):
                log_probs = torch.log_softmax(model(torch.tensor([beam])).logits[0, -1].double(), dim=-1)
                top = log_probs.topk(fan)
                for log_prob, token in zip(top.values.tolist(), top.indices.tolist()):
                    child = beam + [token]
                    sigma = float(per_layer_sigma(_routing_counts(model, child), kind="counts").mean())
                    score = -(total + log_prob) / (len(beam)) + sigma / tau
                    candidates.append((score, child, total + log_prob))
            candidates.sort(key=lambda item: item[0])
            beams = [child for _, child, _ in candidates[:width]]
            sums = [total for _, _, total in candidates[:width]]
    return beams[0]


def test_child_balance_search_matches_a_search_without_cache(q3):
    """preset moequant_paper: counts sigma of the child sequence, tau 1.2."""
    model, _ = q3
    options = EbssOptions(num_samples=1, seq_len=7, beam=2, child_top_m=3, preset="moequant_paper")
    assert (options.sigma, options.balance_on, options.tau) == ("counts", "child", 1.2)
    for first in (3784, 2171):
        searched = ebss_search(model, torch.tensor([first]), SEPARATOR, options, vocab_limit=8192)
        assert searched[0].tolist() == reference_child_balance_search(model, first, 7, 2, 3, 1.2)


def test_child_search_without_balance_is_plain_beam_search(q3):
    """A huge tau leaves only the log-probs; with child_top_m >= beam every beam-search survivor is a candidate."""
    model, _ = q3
    options = EbssOptions(num_samples=1, seq_len=9, beam=3, child_top_m=3, balance_on="child", sigma="counts",
                          tau=1e12, no_repeat_ngram=0)
    searched = ebss_search(model, torch.tensor([3784]), SEPARATOR, options, vocab_limit=8192)
    assert searched[0].tolist() == reference_beam_search(model, 3784, 9, 3)


def test_paper_tau_balances_where_the_frequency_form_does_not(q3, tmp_path):
    """At the paper's tau 1.2, sigma on counts of the child makes the set more balanced than plain beam search; the
    frequency form at the same tau equals plain beam search."""
    model, tokenizer = q3
    sizes = {"num_samples": 2, "seq_len": 24}
    beam = generate_ebss(model, tokenizer, EbssOptions(**sizes, tau=math.inf), cache_dir=tmp_path)
    frequency = generate_ebss(model, tokenizer, EbssOptions(**sizes, tau=1.2), cache_dir=tmp_path)
    paper = generate_ebss(model, tokenizer, EbssOptions(**sizes, preset="moequant_paper"), cache_dir=tmp_path)
    assert torch.equal(frequency.input_ids, beam.input_ids)
    assert paper.usage_std < 0.9 * beam.usage_std


def test_defaults_are_the_measured_best_and_the_paper_preset_keeps_the_papers_settings():
    """The default is the form that measured best for 2-bit GPTQ (tau 0.001 on frequencies of the parent beam, no
    repeated 4-grams); ``preset: moequant_paper`` keeps the paper's (counts of the child, tau 1.2, no n-gram ban),
    and either may still be overridden where the preset does not fix the balance form."""
    default = EbssOptions()
    assert (default.sigma, default.balance_on, default.tau, default.no_repeat_ngram) == ("frequency", "parent", 0.001, 4)
    paper = EbssOptions(preset="moequant_paper")
    assert (paper.sigma, paper.balance_on, paper.tau, paper.no_repeat_ngram) == ("counts", "child", 1.2, 0)
    assert EbssOptions(preset="moequant_paper", no_repeat_ngram=4).no_repeat_ngram == 4
    assert EbssOptions(no_repeat_ngram=0).cache_fields()["no_repeat_ngram"] is None  # off, as older caches wrote it


def test_no_repeat_ngram_bans_repeated_ngrams(q3):
    """Without it, the beam from this first token loops (" mapping, list, list, list, ..."); with it no bigram
    repeats."""
    model, _ = q3
    first = torch.tensor([3784])
    plain = {"seq_len": 12, "beam": 2, "top_m": 8, "tau": math.inf}  # plain beam search: only the ban differs
    looping = ebss_search(model, first, SEPARATOR, EbssOptions(**plain, no_repeat_ngram=0), vocab_limit=8192)[0]
    banned = ebss_search(model, first, SEPARATOR, EbssOptions(**plain, no_repeat_ngram=2),
                         vocab_limit=8192)[0].tolist()
    bigrams = list(zip(banned, banned[1:]))
    assert len(set(zip(looping.tolist(), looping.tolist()[1:]))) < len(looping) - 1  # the reference does repeat
    assert len(set(bigrams)) == len(bigrams)


def test_balance_lowers_usage_std_below_greedy_and_sampled_generation(q3, tmp_path):
    """2 x 16 tokens. At the spec's tau = 1.2 the balance term (sigma ~ 0.04 for 32 experts) is too small to move
    a 16-token search on this model (it equals plain beam search); tau = 0.001 makes it act."""
    model, tokenizer = q3
    ebss = generate_ebss(model, tokenizer, EbssOptions(num_samples=2, seq_len=16, tau=0.001), cache_dir=tmp_path)
    first = ebss.input_ids[:, :2]
    greedy = model.generate(first, attention_mask=torch.ones_like(first), do_sample=False, max_new_tokens=14,
                            min_new_tokens=14)
    assert ebss.usage_std == pytest.approx(expert_usage_std(model, ebss.input_ids)[0])
    assert ebss.usage_std < expert_usage_std(model, greedy)[0]
    for seed in range(3):
        torch.manual_seed(seed)
        sampled = model.generate(first, attention_mask=torch.ones_like(first), do_sample=True, max_new_tokens=14,
                                 min_new_tokens=14)
        assert ebss.usage_std < expert_usage_std(model, sampled)[0], seed


def test_deterministic_by_seed_and_cached(q3, tmp_path):
    model, tokenizer = q3
    options = EbssOptions(num_samples=2, seq_len=8, seed=3)
    steps = []
    first = generate_ebss(model, tokenizer, options, cache_dir=tmp_path / "a", on_step=lambda *p: steps.append(p))
    again = generate_ebss(model, tokenizer, options, cache_dir=tmp_path / "b")  # a fresh cache: searched again
    assert torch.equal(first.input_ids, again.input_ids) and not again.from_cache
    assert steps[-1] == (6, 6)  # one progress event per search step: (done, total)
    cached = generate_ebss(model, tokenizer, options, cache_dir=tmp_path / "a")
    assert cached.from_cache and torch.equal(cached.input_ids, first.input_ids)
    assert cached.usage_std == first.usage_std
    other = generate_ebss(model, tokenizer, EbssOptions(num_samples=2, seq_len=8, seed=4), cache_dir=tmp_path / "a")
    assert not other.from_cache and not torch.equal(other.input_ids[:, 1], first.input_ids[:, 1])
    assert first.input_ids.shape == (2, 8) and (first.input_ids[:, 0] == SEPARATOR).all()
    assert first.domains == ["ebss", "ebss"] and first.describe()["ebss"]["options"]["tau"] == 0.001


def test_first_tokens_are_ordinary_tokens(q3):
    _, tokenizer = q3
    candidates = first_token_candidates(tokenizer, 8192)
    assert SEPARATOR not in candidates.tolist() and len(candidates) == len(tokenizer) - 1


def test_usage_sigma_is_the_unbiased_std_of_frequencies_averaged_over_layers():
    counts = torch.tensor([[[3.0, 1.0, 0.0, 4.0], [2.0, 2.0, 2.0, 2.0]]])  # [rows=1, layers=2, experts=4]
    expected = np.mean([np.std(np.array([3, 1, 0, 4]) / 8, ddof=1), 0.0])
    assert float(usage_sigma(counts)[0]) == pytest.approx(expected)
    # layers with different expert counts (per-layer pruning): padding columns are not experts
    ragged = torch.tensor([[[3.0, 1.0, 0.0, 4.0], [2.0, 6.0, 0.0, 0.0]]])
    expected = np.mean([np.std(np.array([3, 1, 0, 4]) / 8, ddof=1), np.std(np.array([2, 6]) / 8, ddof=1)])
    assert float(usage_sigma(ragged, [4, 2])[0]) == pytest.approx(expected)


def test_routing_counts_match_the_calibration_statistics(q3):
    """The hooks' top-k counts equal ``expert_token_counts`` of a layer-by-layer calibration pass."""
    model, tokenizer = q3
    calib = load_calibration(tokenizer, files=["bundled"], num_samples=2, seq_len=32)
    sigma, per_layer = expert_usage_std(model, calib.input_ids)
    statistics = collect_statistics(model, calib, ["expert_token_counts"])
    counts = torch.stack([statistics[layer]["expert_token_counts"].double() for layer in sorted(statistics)])
    expected = [np.std(row / row.sum(), ddof=1) for row in counts.numpy()]
    assert per_layer == pytest.approx(expected, rel=1e-6)
    assert sigma == pytest.approx(np.mean(expected), rel=1e-6)


def test_counts_sigma_is_the_papers_formula_on_raw_counts():
    counts = torch.tensor([[[3.0, 1.0, 0.0, 4.0], [2.0, 2.0, 2.0, 2.0]]])
    row = np.array([3, 1, 0, 4], dtype=float)
    direct = np.sqrt(4 / 3 * ((row - row.mean()) ** 2).sum())
    assert float(usage_sigma(counts, kind="counts")[0]) == pytest.approx(np.mean([direct, 0.0]))
    # sqrt(E) * selections times the frequency form
    assert float(per_layer_sigma(counts, kind="counts")[0, 0]) == pytest.approx(
        2 * 8 * float(per_layer_sigma(counts)[0, 0]))
    with pytest.raises(ValueError, match="sigma kind 'std'"):
        usage_sigma(counts, kind="std")


def test_fingerprint_changes_with_an_edit(tmp_path):
    model, _ = load_model(model_folder("moe-ref-q3"), dtype=torch.float32)
    before = model_fingerprint(model)
    assert model_fingerprint(model) == before
    keep_experts(model, {layer: list(range(16)) for layer in range(6)})
    assert model_fingerprint(model) != before


def test_bad_options_fail_with_one_line():
    with pytest.raises(pydantic.ValidationError, match=r"top_m \(2\) must be >= beam \(4\)"):
        EbssOptions(beam=4, top_m=2)
    with pytest.raises(pydantic.ValidationError, match=r"tau\n  Input should be greater than 0"):
        EbssOptions(tau=0)
    with pytest.raises(RecipeError, match="top_m .* must be >= beam"):
        parse_recipe({"calibration": {"ebss": {"beam": 8, "top_m": 4}}})
    with pytest.raises(pydantic.ValidationError, match="preset 'moequant_paper' fixes \\['sigma'\\]"):
        EbssOptions(preset="moequant_paper", sigma="frequency")
    with pytest.raises(RecipeError, match="ebss: unknown key 'width' \\(allowed: num_samples, seq_len, tau"):
        parse_recipe({"calibration": {"ebss": {"width": 4}}})


def test_recipe_ebss_calibration_runs_the_pipeline(tmp_path, testbed, one_thread):
    """``calibration: {ebss: ...}`` feeds the run; the report compares its usage std with the text calibration."""
    from moecompress.pipeline import Pipeline

    recipe = parse_recipe({"calibration": {"files": [str(testbed / "calib")], "seed": 1,
                                           "ebss": {"num_samples": 2, "seq_len": 12, "tau": 0.001,
                                                    "cache_dir": str(tmp_path / "cache")}},
                           "stages": []})
    assert recipe.calibration.ebss.tau == 0.001
    Pipeline.from_recipe(recipe).run(model_folder("moe-ref-q3"), tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    calibration = report["calibration"]
    assert calibration["num_samples"] == 2 and calibration["seq_len"] == 12
    assert calibration["domains"] == {"ebss": 2}
    assert calibration["ebss"]["options"]["seed"] == 1  # inherited from the calibration section
    assert calibration["ebss"]["text_usage_std"] > 0 and calibration["ebss"]["usage_std"] > 0
    assert len(calibration["ebss"]["usage_std_per_layer"]) == 6
    assert list(tmp_path.joinpath("cache").glob("ebss-*.safetensors"))

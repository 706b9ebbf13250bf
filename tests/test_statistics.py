"""Every collected statistic against a direct computation from a full HF forward with hooks.

The reference side loads the whole model with transformers (eager experts), hooks each MoE block's router and
experts module, and recomputes every statistic from the captured tensors with plain torch on the *fused HF
tensors* (not through moecompress's view). The side under test is the lazy layer-by-layer pass straight from the
safetensors checkpoint. Both run in fp32 on the same token batches.
"""

from __future__ import annotations

import pytest
import torch
from conftest import testbed_model_path as model_folder
from torch.nn import functional as F

from moecompress.analysis.super_experts import find_super_experts
from moecompress.calibration import LayerwiseRunner, histogram_quantile, load_calibration
from moecompress.calibration.statistics import STATISTICS
from moecompress.models import find_moe_blocks

ALL_STATISTICS = sorted(STATISTICS)
BATCH_SIZE = 4


def _reference(model, calibration):
    """Per MoE layer: captured router inputs, routing, expert outputs etc. from a full HF forward."""
    views = find_moe_blocks(model)
    captured = {view.layer_index: {"x": [], "index": [], "weights": [], "shared_out": []} for view in views}
    handles = []
    for view in views:
        store = captured[view.layer_index]

        def experts_hook(module, args, kwargs, output, store=store):
            hidden, index, weights = (list(args) + [kwargs.get(k) for k in ("top_k_index", "top_k_weights")])[:3]
            store["x"].append(hidden.detach().clone())
            store["index"].append(index.detach().clone())
            store["weights"].append(weights.detach().float().clone())

        handles.append(view.experts.register_forward_hook(experts_hook, with_kwargs=True))
        for shared in view.shared_experts:
            handles.append(shared.module.register_forward_hook(
                lambda module, args, output, store=store: store["shared_out"].append(output.detach().reshape(-1, output.shape[-1]))))
    with torch.no_grad():
        for start in range(0, calibration.num_samples, BATCH_SIZE):
            model(calibration.input_ids[start:start + BATCH_SIZE], use_cache=False)
    for handle in handles:
        handle.remove()
    return views, {layer: {k: torch.cat(v) if v else None for k, v in store.items()} for layer, store in captured.items()}


def _direct_statistics(view, captured, domain_ids, num_domains, config):
    x = captured["x"].double()
    index, combine = captured["index"], captured["weights"].double()
    router = view.router
    logits = x @ router.weight.double().T
    scoring_softmax = view.routing.scoring == "softmax"
    scores = torch.softmax(logits, -1) if scoring_softmax else torch.sigmoid(logits)
    raw = scores.gather(1, index)
    renorm = raw / raw.sum(-1, keepdim=True)
    gate_up, down = view.experts.gate_up_proj.double(), view.experts.down_proj.double()
    act = view.experts.act_fn
    num_experts, d = gate_up.shape[0], x.shape[1]
    inter = gate_up.shape[1] // 2

    expected = {name: None for name in ALL_STATISTICS}
    expected["router_logit_mean"] = logits.mean(0)
    expected["moe_block_inputs"] = x  # every router input (the sample cap of 2048 tokens is not reached here)
    expected["router_logit_gram"] = logits.T @ logits
    top_logits, top_index = torch.topk(logits, view.routing.top_k, dim=-1)
    expected["tcess_markers"] = torch.zeros_like(logits).scatter_(1, top_index, top_logits).mean(0)
    expected["expert_token_counts"] = torch.bincount(index.reshape(-1), minlength=num_experts)
    by_domain = torch.zeros(num_domains, num_experts, dtype=torch.long)
    for slot in range(index.shape[1]):
        by_domain.index_put_((domain_ids, index[:, slot]), torch.ones_like(domain_ids), accumulate=True)
    expected["expert_token_counts_by_domain"] = by_domain
    sums = {key: torch.zeros(num_experts, dtype=torch.float64) for key in
            ("routing_weight_sums_raw", "routing_weight_sums_renorm", "combine_weight_sums", "reap_sums", "ean_sums")}
    max_abs = torch.zeros(num_experts, dtype=torch.float64)
    energy_l2 = torch.zeros(num_experts, inter, dtype=torch.float64)
    energy_max = torch.zeros(num_experts, inter, dtype=torch.float64)
    hessians = {key: torch.zeros(num_experts, size, size, dtype=torch.float64) for key, size in
                (("expert_input_hessian", d), ("expert_input_hessian_affinity", d), ("down_proj_hessian", inter),
                 ("down_proj_hessian_affinity", inter))}
    mean_all = torch.zeros(num_experts, d, dtype=torch.float64)
    for expert in range(num_experts):
        gate_all, up_all = F.linear(x, gate_up[expert]).chunk(2, dim=-1)
        mean_all[expert] = F.linear(act(gate_all) * up_all, down[expert]).mean(0)
        token, slot = torch.where(index == expert)
        if token.numel() == 0:
            continue
        xe = x[token]
        gate, up = F.linear(xe, gate_up[expert]).chunk(2, dim=-1)
        h = act(gate) * up
        out = F.linear(h, down[expert])
        c = combine[token, slot]
        sums["routing_weight_sums_raw"][expert] = raw[token, slot].sum()
        sums["routing_weight_sums_renorm"][expert] = renorm[token, slot].sum()
        sums["combine_weight_sums"][expert] = c.sum()
        sums["reap_sums"][expert] = (c * out.norm(dim=-1)).sum()
        sums["ean_sums"][expert] = out.norm(dim=-1).sum()
        max_abs[expert] = out.abs().max()
        phi2 = (c[:, None] * h) ** 2
        energy_l2[expert], energy_max[expert] = phi2.sum(0), phi2.amax(0)
        hessians["expert_input_hessian"][expert] = xe.T @ xe
        hessians["expert_input_hessian_affinity"][expert] = (xe * c[:, None]).T @ xe
        hessians["down_proj_hessian"][expert] = h.T @ h
        hessians["down_proj_hessian_affinity"][expert] = (h * c[:, None]).T @ h
    expected.update(sums)
    expected.update(hessians)
    expected["mean_expert_output_all_tokens"] = mean_all
    shared_max = [captured["shared_out"].abs().max().double()] if captured["shared_out"] is not None else []
    expected["max_abs_expert_output"] = {"routed": max_abs, "shared": torch.tensor(shared_max, dtype=torch.float64)}
    expected["camera_energy_l2"] = energy_l2
    expected["camera_energy_max"] = energy_max
    ordered = combine.sort(dim=-1, descending=True).values
    expected["topk_weight_ratio_hist"] = ordered[:, 1:] / ordered[:, :1]  # [T, k-1]: w_r / w_0 per rank
    shared_hessians = {name: {} for name in ("shared_input_hessian", "shared_input_hessian_affinity",
                                             "shared_down_hessian", "shared_down_hessian_affinity")}
    for index, shared in enumerate(view.shared_experts):
        module = shared.module
        h = module.act_fn(F.linear(x, module.gate_proj.weight.double())) * F.linear(x, module.up_proj.weight.double())
        g = torch.sigmoid(F.linear(x, shared.gate.weight.double())).reshape(-1) if shared.gate is not None else torch.ones(len(x), dtype=torch.float64)
        shared_hessians["shared_input_hessian"][index] = x.T @ x
        shared_hessians["shared_input_hessian_affinity"][index] = (x * g[:, None]).T @ x
        shared_hessians["shared_down_hessian"][index] = h.T @ h
        shared_hessians["shared_down_hessian_affinity"][index] = (h * g[:, None]).T @ h
    expected.update(shared_hessians)
    return expected


def _assert_close(actual, expected, name):
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp_min(1e-12)
    error = (actual - expected).abs().max() / scale
    assert error < 2e-4, f"{name}: max error {error:.2e} relative to its largest entry"


@pytest.mark.parametrize("model_name", ["moe-ref-q3", "moe-ref-ds"])
def test_every_statistic_matches_a_direct_computation(model_name, testbed):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_folder(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    calibration = load_calibration(tokenizer, files=[testbed / "calib"], num_samples=8, seq_len=32, seed=3)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager")
    views, captured = _reference(model, calibration)

    runner = LayerwiseRunner.from_source(path, dtype=torch.float32)  # lazy, from the safetensors files
    run = runner.run(calibration, ALL_STATISTICS, batch_size=BATCH_SIZE)
    assert sorted(run.layers) == [view.layer_index for view in views]
    domain_ids = calibration.domain_ids().repeat_interleave(calibration.seq_len)

    for view in views:
        stats = run.layers[view.layer_index]
        expected = _direct_statistics(view, captured[view.layer_index], domain_ids, len(calibration.domain_names), model.config)
        assert stats.num_tokens == calibration.input_ids.numel()
        for name in ALL_STATISTICS:
            got, want = stats[name], expected[name]
            if name in ("expert_token_counts", "expert_token_counts_by_domain"):
                assert torch.equal(got, want), name
            elif name == "topk_weight_ratio_hist":
                assert got.shape[0] == want.shape[1]  # one histogram per rank r >= 1
                bins = got.shape[1]
                for rank in range(want.shape[1]):
                    want_hist = torch.bincount((want[:, rank] * bins).long().clamp(0, bins - 1), minlength=bins)
                    assert int(got[rank].sum()) == want.shape[0]
                    assert int((got[rank] - want_hist).abs().sum()) <= 2  # fp32 vs fp64 at a bin edge
                    ordered = want[:, rank].sort().values
                    for q in (0.25, 0.5, 0.9):
                        rank_value = float(ordered[max(int(torch.tensor(q * want.shape[0]).ceil()) - 1, 0)])
                        assert abs(histogram_quantile(got[rank], q) - rank_value) <= 1.0 / bins, (rank, q)
            elif name == "max_abs_expert_output":
                _assert_close(got["routed"], want["routed"], name)
                assert len(got["shared"]) == len(want["shared"])
                if len(want["shared"]):
                    _assert_close(got["shared"], want["shared"], name + "/shared")
            elif name.startswith("shared_"):
                assert sorted(got) == sorted(want) == list(range(len(view.shared_experts))), name
                for index in want:
                    _assert_close(got[index], want[index], f"{name}[{index}]")
            elif name in ("camera_energy_l2", "camera_energy_max"):
                _assert_close(got["routed"], want, name)
            else:
                _assert_close(got, want, name)


def test_super_experts_rule_on_collected_maxima(testbed):
    """P99.5 and max/10 over the first 75% of layers, routed and shared, checked on real collected maxima."""
    path = model_folder("moe-ref-ds")
    from transformers import AutoTokenizer

    calibration = load_calibration(AutoTokenizer.from_pretrained(path), files=[testbed / "calib"], num_samples=4,
                                   seq_len=48, seed=0)
    run = LayerwiseRunner.from_source(path, dtype=torch.float32).run(calibration, ["max_abs_expert_output"])
    found = find_super_experts(run.layers, run.num_hidden_layers)
    assert found.included_layers == [1, 2, 3]  # int(6 * 0.75) = 4: decoder layers 0..3, layer 0 is dense
    pool = torch.cat([torch.cat([run.layers[l]["max_abs_expert_output"]["routed"],
                                 run.layers[l]["max_abs_expert_output"]["shared"]]) for l in (1, 2, 3)]).double()
    threshold = torch.quantile(pool, 0.995)
    expected = set()
    for layer in (1, 2, 3):
        routed = run.layers[layer]["max_abs_expert_output"]["routed"]
        for expert, value in enumerate(routed.tolist()):
            if value > threshold and value > pool.max() / 10:
                expected.add((layer, expert))
    assert set(found.routed) == expected
    assert found.max_score == pytest.approx(float(pool.max()))
    # at most ceil(0.5% of the pool) experts can lie strictly above the 99.5th percentile
    assert len(found.routed) + len(found.shared) <= int(0.005 * pool.numel()) + 1


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

"""The device logic, checked on CPU (no GPU here): where a model goes for evaluation (one device, or a device map
over GPUs and CPU) decided on a meta skeleton for a pretend machine; a lazy run holding one decoder layer at a time
on the compute device; torch's int4 matmul baseline of the kernel benchmark; and the GPU check's dry run, every step
up to its first CUDA call."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from conftest import testbed_model_path as model_folder

from moecompress.checkpoint.native import build_meta_model
from moecompress.checkpoint.placement import HEADROOM, model_bytes, plan_placement
from moecompress.errors import UsageError
from moecompress.evals.loading import eval_placement

GIB = 1 << 30


@pytest.fixture(scope="module")
def skeleton():
    from transformers import AutoConfig

    return build_meta_model(AutoConfig.from_pretrained(str(model_folder("moe-ref-q3"))), dtype=torch.bfloat16)


def test_a_model_that_fits_goes_whole_on_the_first_gpu(skeleton):
    size = model_bytes(skeleton)
    assert size > 0 and all(p.device.type == "meta" for p in skeleton.parameters())  # shapes only
    assert plan_placement(skeleton, "cuda", free_memory=[80 * GIB, 80 * GIB]).device == "cuda:0"
    assert plan_placement(skeleton, "cuda:1", free_memory=[1, 80 * GIB]).device == "cuda:1"  # the user's choice
    assert plan_placement(skeleton, "cpu").device == "cpu"


def test_a_model_larger_than_one_gpu_is_spread_over_the_gpus_then_the_cpu(skeleton):
    size = model_bytes(skeleton)
    third = int(size / 3 / HEADROOM) + 1
    placement = plan_placement(skeleton, "cuda", free_memory=[third, third, third, third], cpu_memory=10 * GIB)
    assert placement.device is None and placement.spread
    used = set(placement.device_map.values())
    assert len(used - {"cpu"}) >= 3 and used <= {0, 1, 2, 3, "cpu"}
    # a decoder layer is never split between devices (the model's _no_split_modules)
    assert not any(key.startswith("model.layers.0.") for key in placement.device_map)
    offloaded = plan_placement(skeleton, "cuda", free_memory=[int(size * 0.6 / HEADROOM)], cpu_memory=10 * GIB)
    assert "cpu" in offloaded.device_map.values() and 0 in offloaded.device_map.values()


def test_an_explicit_device_map_spreads_even_a_model_that_fits(skeleton):
    placement = plan_placement(skeleton, "cuda", device_map="balanced", free_memory=[80 * GIB, 80 * GIB],
                               cpu_memory=10 * GIB)
    assert set(placement.device_map.values()) == {0, 1}


def test_impossible_placements_are_one_line_errors(skeleton):
    with pytest.raises(UsageError, match="does not fit in the GPUs' and the CPU's memory"):
        plan_placement(skeleton, "cuda", free_memory=[1024], cpu_memory=1024)
    with pytest.raises(UsageError, match="needs --device cuda"):
        plan_placement(skeleton, "cpu", device_map="auto")
    with pytest.raises(UsageError, match="no CUDA GPU is visible"):
        plan_placement(skeleton, "cuda", free_memory=[])
    with pytest.raises(UsageError, match="not known"):
        plan_placement(skeleton, "cuda", device_map="everywhere", free_memory=[GIB])


def test_eval_placement_reads_the_config_not_the_weights(monkeypatch):
    import moecompress.checkpoint.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("no weights may be read"))
    size = model_bytes(build_meta_model(__import__("transformers").AutoConfig.from_pretrained(
        str(model_folder("moe-ref-mx"))), dtype=torch.bfloat16))
    half = int(size / 2 / HEADROOM) + 1
    placement = eval_placement(model_folder("moe-ref-mx"), device="cuda", dtype=torch.bfloat16,
                               free_memory=[half, half], cpu_memory=GIB)
    assert placement.spread and {0, 1} <= set(placement.device_map.values())
    assert eval_placement(model_folder("moe-ref-mx"), device="cpu", dtype=torch.float32).device == "cpu"


def test_a_lazy_sweep_holds_one_decoder_layer_on_the_compute_device(testbed, one_thread):
    """The model stays on disk (meta); each layer is loaded onto the compute device (here the CPU), used and
    released before the next: while layer l runs, every other decoder layer is still meta."""
    from moecompress.calibration import LayerwiseRunner

    runner = LayerwiseRunner.from_source(model_folder("moe-ref-q3"), device="cpu", dtype=torch.float32)
    seen = []

    def check(layer_index, layer, collectors):
        on_device = [index for index, other in enumerate(runner.layers)
                     if any(p.device.type != "meta" for p in other.parameters())]
        seen.append(on_device)

    runner.run(torch.randint(3, 8000, (2, 16)), ["expert_token_counts"], batch_size=2, layer_callback=check)
    assert seen == [[index] for index in range(len(runner.layers))]
    assert all(p.device.type == "meta" for layer in runner.layers for p in layer.parameters())


def test_torch_int4_baseline_of_the_kernel_benchmark_matches_the_reference():
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import kernel_speed

    from moecompress.kernels.reference import packed_linear_reference
    from moecompress.quantization.packing import quantize_rtn

    generator = torch.Generator().manual_seed(0)
    packed = quantize_rtn(torch.randn(64, 256, generator=generator) * 0.02, 4, 128, scale_dtype=torch.bfloat16)
    linear, note = kernel_speed.torch_int4_linear(packed, "cpu")
    assert linear is not None, note
    x = torch.randn(3, 256, generator=generator)
    reference = packed_linear_reference(x, packed)
    assert kernel_speed.relative_error(linear(x.to(torch.bfloat16)), reference) < 2e-2
    assert kernel_speed.torch_int4_linear(quantize_rtn(torch.randn(8, 32), 2, 16), "cpu")[0] is None


def test_eval_takes_a_dtype_and_refuses_a_device_map_without_gpus(testbed):
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    base = [sys.executable, "-m", "moecompress", "eval", str(model_folder("moe-ref-q3")), "--tasks", "tb_arith",
            "--limit", "2", "--json"]
    scored = subprocess.run([*base, "--dtype", "bfloat16"], capture_output=True, text=True, env=environment)
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert "acc" in json.loads(scored.stdout)["tb_arith"]
    refused = subprocess.run([*base, "--device-map", "auto"], capture_output=True, text=True, env=environment)
    assert refused.returncode == 2
    assert "needs --device cuda" in refused.stderr.strip().splitlines()[-1]


def test_gpu_check_dry_run_reaches_every_steps_first_cuda_call(testbed, tmp_path):
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment.update(PYTHON=sys.executable, PYTHONPATH=str(REPO_ROOT))
    finished = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh"), "--dry", "--out", str(tmp_path),
                               "--models", "moe-ref-q3", "--threads", "1"],
                              capture_output=True, text=True, env=environment, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry"] is True
    steps = result["steps"]
    assert list(steps) == ["environment", "kernel_tests", "kernel_speed", "gptq_cuda_vs_cpu", "decode_speed"]
    assert {name: step["status"] for name, step in steps.items()} == dict.fromkeys(steps, "dry")
    assert steps["environment"]["missing_modules"] == []
    assert "--bits 2,4" in steps["kernel_speed"]["command"]
    compared = steps["gptq_cuda_vs_cpu"]["models"]["moe-ref-q3"]["dry_self_comparison"]
    assert compared["codes_compared"] > 0 and compared["codes_differ"] == 0
    assert compared["logits_top1_agreement"] == 1.0 and compared["logits_max_abs_diff"] == 0.0
    assert steps["decode_speed"]["packed"]["tokens_per_second"] > 0
    assert steps["decode_speed"]["packed"]["experts_implementation"] == "moecompress_packed"

"""The scale plan: per-layer cost of a compress run measured on CPU, projected to whole models on 1 and 8 GPUs.

Measured (CPU, one process, ``--threads``), per MoE decoder layer, with the code a run uses (a lazy
``LayerwiseRunner`` and ``quantize_model``, timed from outside by wrapping their calls):

* ``profile``: the profiling pass (forward + super-expert and usage statistics);
* ``hessians``: the GPTQ sweep's collection passes (forward + per-expert Hessians, gate/up then down);
* ``solve``: the GPTQ solves (``gptq_quantize``, all experts of the layer; per expert = solve / experts);
* ``propagation``: the forward that carries the calibration tokens through the quantised layer;

each with its peak resident memory (``VmHWM`` reset before the phase). Shapes: the test-bed models, and synthetic
random checkpoints with the real dimensions of one Qwen3-30B-A3B layer and one DeepSeek-V3 layer (MLA attention,
a shared expert, group routing) built once under ``--cache``; to fit this machine they hold fewer routed experts
than the real layers (``--experts``) with the real top-k, so every token still runs k experts of the real size.

Projected: per-token phases (profile, Hessians, propagation) scale with the calibration tokens, solves with the
experts; whole model = MoE layers x per-layer cost. For GPUs, each phase's floating-point work (counted from the
shapes, printed beside the CPU's achieved rate as a check of the count) at an assumed sustained H100 rate
(:data:`GPU`), plus the launch-bound GPTQ column loop; 8 GPUs = the data-parallel phases and the solves split 8
ways plus the Hessian reduction and weight sharing over NVLink. Run on a quiet machine:

    python benchmarks/scale_plan.py --shapes testbed,qwen3-30b-a3b,deepseek-v3 --threads 2 \\
        --json-out results/scale_plan.json
    python benchmarks/scale_plan.py --shapes qwen3-30b-a3b --dims-scale 0.125 --samples 4   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO_ROOT, add_repo_to_path, add_threads_argument, set_offline, set_threads, testbed_model

set_offline()
add_repo_to_path()

# Real dimensions (the published configs).
REAL = {
    "qwen3-30b-a3b": {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                      "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                      "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "norm_topk_prob": True,
                      "num_hidden_layers": 48, "moe_layers": 48},
    "deepseek-v3": {"model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
                    "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1,
                    "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "q_lora_rank": 1536,
                    "kv_lora_rank": 512, "num_attention_heads": 128, "num_key_value_heads": 128,
                    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "num_hidden_layers": 61,
                    "first_k_dense_replace": 3, "moe_layers": 58},
}
# Assumed sustained H100 SXM rates (why: fp32 matmuls without TF32, torch's default, peak 67 TFLOP/s, large GEMMs
# sustain ~60%; bf16 tensor-core forward of many small expert GEMMs ~25% of the 989 TFLOP/s peak; Cholesky-type
# factorisations ~30% of fp32 peak; HBM3 3.35 TB/s peak, ~75% streamed; ~8 us per kernel launch in the eager GPTQ
# column loop, about 15 launches per column; NVLink 4 450 GB/s per direction; an NVMe drive reading 3 GB/s, each
# layer read twice (profiling pass, sweep), the ranks of a node sharing the page cache). Replace with measured figures
# (scripts/gpu_check.sh) once a GPU is lent.
GPU = {"fp32_matmul_tflops": 40.0, "bf16_forward_tflops": 250.0, "factorisation_tflops": 20.0, "hbm_gbps": 2500.0,
       "launch_us": 8.0, "launches_per_column": 15, "nvlink_gbps": 450.0, "disk_gbps": 3.0}
# A realistic calibration set for the projection: 512 sequences of 2048 tokens.
PROJECT_TOKENS = 512 * 2048
MSE_CANDIDATES = 80  # candidate clippings of the mse scale search (moecompress.quantization.packing)


# ----- synthetic checkpoints -------------------------------------------------------------------------------------
def synthetic_config(shape: str, experts: int, dims_scale: float) -> dict:
    """One dense-free MoE decoder layer of ``shape`` (two for DeepSeek-V3: its first layer is dense), ``experts``
    routed experts, dimensions times ``dims_scale`` (1 = real; smaller for a smoke run)."""
    real = dict(REAL[shape])
    real.pop("moe_layers")

    def scaled(value: int, multiple: int = 16) -> int:
        return max(multiple, int(round(value * dims_scale / multiple)) * multiple)

    for key in ("hidden_size", "intermediate_size", "moe_intermediate_size", "q_lora_rank", "kv_lora_rank"):
        if key in real:
            real[key] = scaled(real[key], 64)
    for key in ("num_attention_heads", "num_key_value_heads"):
        if key in real:
            real[key] = max(1, int(round(real[key] * dims_scale)))
    config = {**real, "vocab_size": 8192, "max_position_embeddings": 4096, "tie_word_embeddings": False,
              "rms_norm_eps": 1e-6, "dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 0}
    if shape == "qwen3-30b-a3b":
        config.update(num_experts=experts, num_hidden_layers=1, architectures=["Qwen3MoeForCausalLM"],
                      decoder_sparse_step=1, mlp_only_layers=[])
    else:
        # group routing needs >= 2 experts a group (top-2 group scores) and enough chosen groups for top-k
        groups = max(1, min(config["n_group"], experts // 2))
        per_group = experts // groups
        chosen = min(groups, max(config["topk_group"], -(-config["num_experts_per_tok"] // per_group)))
        config.update(n_routed_experts=experts, num_hidden_layers=2, first_k_dense_replace=1, n_group=groups,
                      topk_group=chosen, architectures=["DeepseekV3ForCausalLM"])
    config["num_experts_per_tok"] = min(config["num_experts_per_tok"], experts)
    return config


def write_synthetic(folder: Path, config: dict, seed: int = 0) -> None:
    """Random bf16 weights (normal, std 0.02; norms 1) for ``config``, saved as an ordinary checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    hf_config = AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if "norm" in name:
                tensor.fill_(1.0)
            elif "bias" in name or "inv_freq" in name:
                if "inv_freq" not in name:
                    tensor.zero_()
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
        for name, module in model.named_modules():  # rotary inverse frequencies: recompute (to_empty left garbage)
            if hasattr(module, "rope_init_fn") and hasattr(module, "inv_freq"):
                inv_freq, _ = module.rope_init_fn(module.config, "cpu")
                module.inv_freq.copy_(inv_freq)
                if hasattr(module, "original_inv_freq"):
                    module.original_inv_freq = inv_freq
    model.save_pretrained(str(folder), max_shard_size="2GB")


# ----- the measured child ----------------------------------------------------------------------------------------
def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        pass


def _peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(folder: Path, samples: int, seq_len: int, bits: int, group_size: int, hessian_gib: float) -> dict:
    """Per decoder layer: seconds and peak memory of each phase (see the module docstring)."""
    import torch

    from moecompress.calibration import LayerwiseRunner
    from moecompress.calibration.runner import LayerReplay
    from moecompress.models import find_moe_blocks
    from moecompress.pipeline import PROFILE_STATISTICS
    from moecompress.quantization import sequential
    from moecompress.quantization.sequential import QuantizationSettings, quantize_model

    torch.manual_seed(0)
    input_ids = torch.randint(1, 8000, (samples, seq_len))
    layers: dict[int, dict] = {}
    current = {"layer": 0}

    def phase(name: str, function):
        def timed(*args, **kwargs):
            _reset_peak()
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                entry = layers.setdefault(current["layer"], {})
                entry[f"{name}_s"] = entry.get(f"{name}_s", 0.0) + time.perf_counter() - started
                entry[f"{name}_peak"] = max(entry.get(f"{name}_peak", 0), _peak())
                if name == "solve":
                    entry["experts_solved"] = entry.get("experts_solved", 0) + (args[0].shape[0] if args[0].dim() == 3 else 0)
        return timed

    # 1. the profiling pass, layer by layer
    runner = LayerwiseRunner.from_source(folder, dtype=torch.float32)
    moe_layers = sorted({view.layer_index for view in find_moe_blocks(runner.model)})
    marks = [time.perf_counter()]

    def on_layer(done, total):
        current["layer"] = done
        marks.append(time.perf_counter())

    _reset_peak()
    runner.run(input_ids, list(PROFILE_STATISTICS), batch_size=4, on_layer=on_layer)
    for index in range(len(runner.layers)):
        layers.setdefault(index, {})["profile_s"] = marks[index + 1] - marks[index]
    layers[0]["profile_peak"] = _peak()

    # 2. the GPTQ sweep, its calls timed from outside
    original = (LayerReplay.collect, LayerReplay.propagate, sequential.gptq_quantize)
    LayerReplay.collect = phase("hessians", LayerReplay.collect)
    LayerReplay.propagate = phase("propagation", LayerReplay.propagate)
    sequential.gptq_quantize = phase("solve", sequential.gptq_quantize)
    try:
        runner = LayerwiseRunner.from_source(folder, dtype=torch.float32)

        def on_sweep_layer(done, total):
            current["layer"] = done

        current["layer"] = 0
        settings = QuantizationSettings(method="gptq", bits=bits, group_size=group_size,
                                        hessian_memory_bytes=int(hessian_gib * 2**30))
        quantize_model(runner.model, settings, input_ids, runner=runner, batch_size=4, on_layer=on_sweep_layer)
    finally:
        LayerReplay.collect, LayerReplay.propagate, sequential.gptq_quantize = original
    return {"layers": {str(index): entry for index, entry in layers.items() if index < len(runner.layers)},
            "moe_layers": moe_layers, "tokens": samples * seq_len}


# ----- counting and projecting -----------------------------------------------------------------------------------
def shape_numbers(config: dict) -> dict:
    """Sizes of one MoE layer of ``config``: d, I, experts, k, shared intermediate, attention parameters."""
    d = config["hidden_size"]
    inter = config.get("moe_intermediate_size") or config["intermediate_size"]
    experts = config.get("num_experts") or config.get("n_routed_experts") or config.get("num_local_experts")
    shared = (config.get("n_shared_experts") or 0) * inter
    if config.get("q_lora_rank"):  # MLA
        heads, nope, rope, v = (config[k] for k in ("num_attention_heads", "qk_nope_head_dim", "qk_rope_head_dim",
                                                  "v_head_dim"))
        attention = (d * config["q_lora_rank"] + config["q_lora_rank"] * heads * (nope + rope)
                     + d * (config["kv_lora_rank"] + rope) + config["kv_lora_rank"] * heads * (nope + v) + heads * v * d)
    else:
        head_dim = config.get("head_dim") or d // config["num_attention_heads"]
        attention = d * head_dim * (2 * config["num_attention_heads"] + 2 * config["num_key_value_heads"])
    return {"d": d, "I": inter, "E": experts, "k": config["num_experts_per_tok"], "shared_I": shared,
            "attention": attention}


def flops(numbers: dict) -> dict:
    """Floating-point work of one MoE layer: per calibration token (forward, Hessians) and per expert (solve)."""
    d, inter, k, shared = numbers["d"], numbers["I"], numbers["k"], numbers["shared_I"]
    forward = 2 * (numbers["attention"] + k * 3 * d * inter + 3 * d * shared + d * numbers["E"])
    hessian = 2 * k * (d * d + inter * inter)  # x x^T per pick, gate/up and down
    factorise = 2 * (5 / 3) * d ** 3 + 2 * (5 / 3) * inter ** 3  # Cholesky, inverse, Cholesky of H^-1; both halves
    sweep = 2 * (2 * inter) * d * d + 2 * d * inter * inter  # the column sweep's block updates
    search = MSE_CANDIDATES * 12 * (2 * inter * d + d * inter)  # the mse clipping search, elementwise
    return {"forward_per_token": forward, "hessian_per_token": hessian, "factorise_per_expert": factorise,
            "sweep_per_expert": sweep, "search_per_expert": search, "columns": d + inter}


def project(shape: str, gpus: int, card_gib: float = 80.0) -> dict:
    """Whole-model time and per-GPU memory of ``shape`` on ``gpus`` H100s (assumptions :data:`GPU`).

    Memory per GPU: one layer's bf16 weights, the rank's share of the cached calibration activations (inputs and
    outputs, bf16), and a chunk of per-expert Hessians (fp64 sums + fp32 result, 12 bytes an element) as large as
    the card allows; every chunk costs one more forward pass of the layer (``_expert_chunks``). A rank accumulates
    the whole chunk from its own tokens, so more GPUs shrink the activations, not the chunk."""
    real = shape_numbers(REAL[shape])
    work = flops(real)
    layers = REAL[shape]["moe_layers"]
    weights = (real["attention"] + real["E"] * 3 * real["d"] * real["I"] + 3 * real["d"] * real["shared_I"]) * 2
    activations = PROJECT_TOKENS / gpus * real["d"] * 2 * 2
    free = card_gib * 2**30 - 6 * 2**30 - weights - activations  # 6 GiB for the CUDA context and temporaries
    per_expert_hessian = real["d"] ** 2 * 12
    if free < per_expert_hessian:
        return {"gpus": gpus, "fits": False, "memory_per_gpu_gib": (weights + activations) / 2**30}
    chunk = min(real["E"] * per_expert_hessian, free)
    chunks = math.ceil(real["E"] * per_expert_hessian / chunk) + math.ceil(real["E"] * real["I"] ** 2 * 12 / chunk)
    forward_s = work["forward_per_token"] * PROJECT_TOKENS / gpus / (GPU["bf16_forward_tflops"] * 1e12)
    hessian_s = work["hessian_per_token"] * PROJECT_TOKENS / gpus / (GPU["fp32_matmul_tflops"] * 1e12)
    stack = max(1, min(real["E"], int(chunk // ((8 * 2 * real["I"] + real["d"]) * real["d"] * 4))))
    solve_per_expert = (work["factorise_per_expert"] / (GPU["factorisation_tflops"] * 1e12)
                        + work["sweep_per_expert"] / (GPU["fp32_matmul_tflops"] * 1e12)
                        + work["search_per_expert"] * 4 / (GPU["hbm_gbps"] * 1e9)  # ~4 bytes per elementwise op
                        + work["columns"] * GPU["launches_per_column"] * GPU["launch_us"] * 1e-6 / stack)
    hessian_bytes = real["E"] * (real["d"] ** 2 + real["I"] ** 2) * 8  # fp64 sums reduced to their owners
    packed_bytes = real["E"] * 3 * real["d"] * real["I"] * 4 / 8  # 4-bit experts shared with every rank
    parts = {"disk": 2 * weights / (GPU["disk_gbps"] * 1e9), "profile": forward_s,
             "hessians": chunks * forward_s + hessian_s,
             "solve": solve_per_expert * math.ceil(real["E"] / gpus), "propagation": forward_s,
             "communication": 0.0 if gpus == 1 else (2 * hessian_bytes + packed_bytes) / (GPU["nvlink_gbps"] * 1e9)}
    per_layer = sum(parts.values())
    return {"gpus": gpus, "fits": True, "per_layer_s": per_layer, "total_h": per_layer * layers / 3600,
            "parts_per_layer_s": parts, "hessian_passes": chunks, "gptq_stack": stack,
            "memory_per_gpu_gib": (weights + activations + chunk) / 2**30}


def cpu_check(measured: dict, config: dict) -> dict:
    """The CPU's achieved GFLOP/s per phase on the measured layer (the FLOP count above, checked)."""
    numbers = shape_numbers(config)
    work = flops(numbers)
    tokens = measured["tokens"]
    rows = {}
    for layer in measured["moe_layers"]:
        entry = measured["layers"][str(layer)]
        experts = entry.get("experts_solved", 0) / 2 or numbers["E"]  # gate/up and down stacks count twice
        rows[layer] = {
            "profile_gflops": work["forward_per_token"] * tokens / entry["profile_s"] / 1e9,
            "hessians_gflops": (2 * work["forward_per_token"] + work["hessian_per_token"]) * tokens
            / entry["hessians_s"] / 1e9,
            "solve_s_per_expert": entry["solve_s"] / experts,
            "propagation_gflops": work["forward_per_token"] * tokens / entry["propagation_s"] / 1e9,
        }
    return rows


# ----- main ------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="testbed,qwen3-30b-a3b,deepseek-v3")
    parser.add_argument("--experts", default="qwen3-30b-a3b=32,deepseek-v3=8",
                        help="routed experts of each synthetic layer (real top-k kept)")
    parser.add_argument("--dims-scale", type=float, default=1.0, help="scale the synthetic dimensions (smoke runs)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--hessian-gib", type=float, default=8.0)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/moecompress-scale-plan"))
    add_threads_argument(parser, 2)
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        set_threads(args.threads)
        print(json.dumps(measure(args.child, args.samples, args.seq_len, args.bits, args.group_size,
                                 args.hessian_gib)))
        return
    experts = {name: int(count) for name, count in (item.split("=") for item in args.experts.split(","))}
    results = {}
    for shape in args.shapes.split(","):
        folders = []
        if shape == "testbed":
            folders = [(name, testbed_model(name)) for name in ("moe-ref-q3", "moe-ref-mx", "moe-ref-ds")]
        else:
            config = synthetic_config(shape, experts[shape], args.dims_scale)
            folder = args.cache / f"{shape}-e{experts[shape]}-x{args.dims_scale:g}"
            if not (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").is_file():
                started = time.perf_counter()
                write_synthetic(folder, config)
                print(f"wrote {folder} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
            folders = [(shape, folder)]
        for name, folder in folders:
            command = [sys.executable, __file__, "--child", str(folder), "--samples", str(args.samples),
                       "--seq-len", str(args.seq_len), "--bits", str(args.bits), "--group-size", str(args.group_size),
                       "--hessian-gib", str(args.hessian_gib), "--threads", str(args.threads)]
            finished = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
            if finished.returncode != 0:
                raise SystemExit(f"{name}: measuring failed:\n{finished.stderr[-3000:]}")
            measured = json.loads(finished.stdout.strip().splitlines()[-1])
            config = json.loads((folder / "config.json").read_text())
            results[name] = {"measured": measured, "config_dims": shape_numbers(config),
                             "cpu_rates": cpu_check(measured, config)}
            if shape in REAL:
                results[name]["projection"] = [project(shape, gpus) for gpus in (1, 8)]
    print(markdown(results, args))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"arguments": {k: str(v) for k, v in vars(args).items()},
                                             "gpu_assumptions": GPU, "project_tokens": PROJECT_TOKENS,
                                             "results": results}, indent=1))


def markdown(results: dict, args) -> str:
    lines = [f"Measured per MoE layer on CPU ({args.threads} threads, {args.samples} x {args.seq_len} tokens, "
             f"{args.bits}-bit GPTQ group {args.group_size}; seconds, peak GiB):", "",
             "| model (experts measured) | profile s | Hessians s | solve s (per expert) | propagation s | peak GiB | "
             "CPU GFLOP/s profile / Hessians / propagation |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, result in results.items():
        measured = result["measured"]
        for layer in measured["moe_layers"][:1]:  # the first MoE layer; the others are alike
            entry = measured["layers"][str(layer)]
            experts = entry.get("experts_solved", 0) / 2 or result["config_dims"]["E"]
            peak = max(value for key, value in entry.items() if key.endswith("_peak")) / 2**30
            rates = result["cpu_rates"][layer] if layer in result["cpu_rates"] else result["cpu_rates"][str(layer)]
            lines.append(f"| {name} ({result['config_dims']['E']}) | {entry['profile_s']:.2f} | "
                         f"{entry['hessians_s']:.2f} | {entry['solve_s']:.2f} ({entry['solve_s'] / experts:.3f}) | "
                         f"{entry['propagation_s']:.2f} | {peak:.2f} | {rates['profile_gflops']:.0f} / "
                         f"{rates['hessians_gflops']:.0f} / {rates['propagation_gflops']:.0f} |")
    projections = {name: result["projection"] for name, result in results.items() if "projection" in result}
    if projections:
        lines += ["", f"Projected whole compress (GPTQ 4-bit, {PROJECT_TOKENS // 2048} x 2048 calibration tokens) on "
                  "H100s at the assumed rates:", "",
                  "| model | GPUs | per MoE layer s | whole model h | memory per GPU GiB | Hessian passes | "
                  "disk / profile / Hessians / solve / propagation / communication s per layer |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for name, rows in projections.items():
            for row in rows:
                if not row["fits"]:
                    lines.append(f"| {name} | {row['gpus']} | does not fit | | {row['memory_per_gpu_gib']:.0f} | | |")
                    continue
                parts = " / ".join(f"{value:.1f}" for value in row["parts_per_layer_s"].values())
                lines.append(f"| {name} | {row['gpus']} | {row['per_layer_s']:.1f} | {row['total_h']:.2f} | "
                             f"{row['memory_per_gpu_gib']:.0f} | {row['hessian_passes']} | {parts} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

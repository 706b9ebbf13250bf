"""Peak memory of a lazy layer-by-layer calibration pass on a checkpoint much larger than the memory it may use.

1. Writes a random-init Qwen3-MoE checkpoint (bf16, per-expert keys like transformers saves, one safetensors shard
   per decoder layer, an index) layer by layer, so writing it never holds the model in memory either.
2. Runs the calibration pass on it in a fresh child process and reports the child's peak RSS (``ru_maxrss``,
   resident memory including file pages mapped from the checkpoint) next to the checkpoint size.

    python benchmarks/calibration_memory.py --folder /tmp/moe-3gb --size-gb 3

The run is *allowed* a third of the checkpoint size (``--budget-fraction``, default 1/3): a watchdog in the parent
polls the child's resident memory (``VmRSS`` in ``/proc/PID/status``) every 20 ms and kills the child the moment it
exceeds the budget, and the benchmark fails (exit 1) when the child's final ``ru_maxrss`` is over budget. So a
pass that needed the model in memory cannot pass this benchmark.

``--limit-gb`` additionally caps the child's address space with ``RLIMIT_AS``. That cap counts virtual
reservations, not memory used: importing torch and transformers alone peaks at ~0.65 GiB of address space, and
glibc/torch reserve more per thread and per large allocation, so a 1 GiB cap fails (or stalls in the kernel) while
resident memory is ~0.5 GiB. Peak RSS is the meaningful number; the cap is off by default.

``--stages prune+gptq`` measures a whole streamed compress run instead of the pass alone: the pipeline (profiling
pass, ``prune_frequency`` to 3/4 of the experts decided from it, GPTQ 4-bit layer by layer on calibration inputs
that went through the quantised layers, the output checkpoint written shard by shard; ``moecompress.streaming``)
under the same watchdog. The benchmark copies the bundled demo model's tokenizer beside the random weights (same
8192-token vocabulary) and calibrates on ``demo/calib``; the output goes to ``<folder>-out``.

The model is random, so the statistics are meaningless; only memory and time are measured.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO_ROOT, add_threads_argument, set_threads

STATISTICS = ["max_abs_expert_output", "expert_token_counts", "reap_sums", "router_logit_gram", "tcess_markers"]


def shape_for_size(size_gb: float) -> dict:
    """A Qwen3-MoE config (hidden 1024, 64 experts of I=256, top-8) with enough layers for ``size_gb`` of bf16.

    Many thin layers rather than few wide ones: the point is that memory follows one layer, not the model."""
    hidden, experts, inter = 1024, 64, 256
    expert_params = experts * 3 * hidden * inter
    attention_params = 4 * hidden * hidden
    layers = max(2, round(size_gb * 1e9 / 2 / (expert_params + attention_params + experts * hidden)))
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 128,
        "intermediate_size": 2048, "moe_intermediate_size": inter, "num_experts": experts, "num_experts_per_tok": 8,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 8192,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "dtype": "bfloat16",
        "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "hidden_act": "silu",
    }


def write_checkpoint(folder: Path, size_gb: float, seed: int = 0) -> int:
    """Random bf16 weights, one shard per layer. Returns the bytes written."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = shape_for_size(size_gb)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    generator = torch.Generator().manual_seed(seed)
    hidden, inter, experts = config["hidden_size"], config["moe_intermediate_size"], config["num_experts"]
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]

    def weight(*shape, scale=0.02):
        return (torch.randn(*shape, generator=generator) * scale).to(torch.bfloat16)

    weight_map, total = {}, 0

    def save(file_name: str, tensors: dict) -> int:
        save_file(tensors, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update({key: file_name for key in tensors})
        return sum(t.numel() * t.element_size() for t in tensors.values())

    total += save("model-embed.safetensors", {"model.embed_tokens.weight": weight(config["vocab_size"], hidden),
                                              "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)})
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        tensors = {
            prefix + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            prefix + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            prefix + "self_attn.q_proj.weight": weight(heads * head_dim, hidden),
            prefix + "self_attn.k_proj.weight": weight(kv_heads * head_dim, hidden),
            prefix + "self_attn.v_proj.weight": weight(kv_heads * head_dim, hidden),
            prefix + "self_attn.o_proj.weight": weight(hidden, heads * head_dim),
            prefix + "self_attn.q_norm.weight": torch.ones(head_dim, dtype=torch.bfloat16),
            prefix + "self_attn.k_norm.weight": torch.ones(head_dim, dtype=torch.bfloat16),
            prefix + "mlp.gate.weight": weight(experts, hidden, scale=0.2),
        }
        for expert in range(experts):
            tensors[prefix + f"mlp.experts.{expert}.gate_proj.weight"] = weight(inter, hidden)
            tensors[prefix + f"mlp.experts.{expert}.up_proj.weight"] = weight(inter, hidden)
            tensors[prefix + f"mlp.experts.{expert}.down_proj.weight"] = weight(hidden, inter)
        total += save(f"model-layer{layer:03d}.safetensors", tensors)  # one layer in memory at a time
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    return total


def child(folder: Path, limit_bytes: int, num_samples: int, seq_len: int, batch_size: int, dtype: str) -> None:
    """The measured process: cap the address space, run the pass, print JSON."""
    if limit_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    import torch

    from moecompress.calibration import LayerwiseRunner

    torch.manual_seed(0)
    input_ids = torch.randint(1, 8192, (num_samples, seq_len))
    input_ids[:, 0] = 0
    started = time.perf_counter()
    runner = LayerwiseRunner.from_source(folder, dtype=getattr(torch, dtype))
    run = runner.run(input_ids, STATISTICS, batch_size=batch_size)
    seconds = time.perf_counter() - started
    counts = sum(int(stats["expert_token_counts"].sum()) for stats in run.layers.values())
    print(json.dumps({"seconds": seconds, "layers": len(run.layers), "routed_token_slots": counts,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


DEMO_MODEL = REPO_ROOT / "demo" / "models" / "moe-ref-q3"


def compress_child(folder: Path, num_samples: int, seq_len: int, batch_size: int, dtype: str,
                   hessian_memory_gib: float) -> None:
    """The measured process for ``--stages prune+gptq``: a streamed compress run, then print JSON."""
    import shutil

    from moecompress.pipeline import Pipeline

    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (folder / name).is_file():
            shutil.copyfile(DEMO_MODEL / name, folder / name)
    recipe = {
        "calibration": {"files": [str(REPO_ROOT / "demo" / "calib")], "num_samples": num_samples, "seq_len": seq_len,
                        "batch_size": batch_size},
        "stages": [{"method": "prune_frequency", "keep_ratio": 0.75},
                   {"method": "gptq", "bits": 4, "group_size": 128, "hessian_memory_gib": hessian_memory_gib}],
    }
    out = folder.parent / f"{folder.name}-out"
    started = time.perf_counter()
    report = Pipeline.from_recipe(recipe).run(folder, out, dtype=dtype, overwrite=True, execution="streamed")
    seconds = time.perf_counter() - started
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(json.dumps({"seconds": seconds, "layers": len(report["calibration"]["moe_layers"]),
                      "output_bytes": written, "timings": report["timings"],
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/moecompress-bench-3gb"))
    parser.add_argument("--size-gb", type=float, default=3.0)
    parser.add_argument("--limit-gb", type=float, default=0.0, help="RLIMIT_AS of the measured process (0: none)")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"],
                        help="compute dtype of each loaded layer (bf16 matmuls are very slow on this CPU)")
    add_threads_argument(parser, 1)
    parser.add_argument("--budget-fraction", type=float, default=1 / 3,
                        help="resident memory the pass may use, as a fraction of the checkpoint size (default 1/3)")
    parser.add_argument("--stages", default="none", choices=["none", "prune+gptq"],
                        help="none: the calibration pass alone; prune+gptq: a streamed compress run (see above)")
    parser.add_argument("--hessian-memory-gib", type=float, default=0.0625,
                        help="prune+gptq: memory for one chunk of per-expert Hessians (the gptq stage option)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        set_threads(args.threads)
        if args.stages == "prune+gptq":
            compress_child(args.folder, args.num_samples, args.seq_len, args.batch_size, args.dtype,
                           args.hessian_memory_gib)
            return
        child(args.folder, int(args.limit_gb * 2**30), args.num_samples, args.seq_len, args.batch_size, args.dtype)
        return
    if not (args.folder / "model.safetensors.index.json").is_file():
        started = time.perf_counter()
        written = write_checkpoint(args.folder, args.size_gb)
        print(f"wrote {written / 2**30:.2f} GiB random bf16 checkpoint to {args.folder} in {time.perf_counter() - started:.0f} s")
    checkpoint_bytes = sum(f.stat().st_size for f in args.folder.glob("*.safetensors"))
    command = [sys.executable, __file__, "--child", "--folder", str(args.folder), "--limit-gb", str(args.limit_gb),
               "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len),
               "--batch-size", str(args.batch_size), "--dtype", args.dtype, "--threads", str(args.threads),
               "--stages", args.stages, "--hessian-memory-gib", str(args.hessian_memory_gib)]
    budget_bytes = int(checkpoint_bytes * args.budget_fraction)
    returncode, stdout, stderr, watchdog_peak = run_within_budget(command, budget_bytes)
    if returncode != 0:
        print(stdout, stderr[-4000:], sep="\n")
        if watchdog_peak > budget_bytes:
            raise SystemExit(f"calibration pass killed: resident memory {watchdog_peak / 2**30:.2f} GiB exceeded the "
                             f"budget of {budget_bytes / 2**30:.2f} GiB")
        raise SystemExit(f"calibration pass failed (exit {returncode})")
    measured = json.loads(stdout.strip().splitlines()[-1])
    peak = max(measured["peak_rss_bytes"], watchdog_peak)
    print(f"checkpoint on disk: {checkpoint_bytes / 2**30:.2f} GiB ({shape_for_size(args.size_gb)['num_hidden_layers']} layers)")
    print(f"address-space limit of the pass: {args.limit_gb:.2f} GiB (RLIMIT_AS)" if args.limit_gb else "no limit")
    what = "streamed compress run (prune_frequency 3/4 + GPTQ 4-bit)" if args.stages == "prune+gptq" else "calibration pass"
    print(f"{what}: {args.num_samples} x {args.seq_len} tokens, {args.dtype}, {measured['seconds']:.1f} s, "
          f"{measured['layers']} MoE layers")
    if "output_bytes" in measured:
        print(f"output checkpoint: {measured['output_bytes'] / 2**30:.2f} GiB; phases (s): "
              + ", ".join(f"{name} {seconds:.0f}" for name, seconds in measured["timings"].items()))
    print(f"memory budget (watchdog on resident memory): {budget_bytes / 2**30:.2f} GiB = "
          f"{args.budget_fraction:.2f} x the checkpoint size")
    print(f"peak RSS: {peak / 2**30:.2f} GiB = {peak / checkpoint_bytes:.2f} x the checkpoint size: "
          f"{'within' if peak <= budget_bytes else 'OVER'} budget")
    if peak > budget_bytes:
        raise SystemExit(1)


def resident_bytes(pid: int) -> int:
    """Current resident memory of process ``pid`` (``VmRSS``), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_within_budget(command: list[str], budget_bytes: int) -> tuple[int, str, str, int]:
    """Run ``command``, killing it as soon as its resident memory exceeds ``budget_bytes``.

    Returns (exit code, stdout, stderr, highest resident memory the watchdog saw)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        highest = 0
        while process.poll() is None:
            highest = max(highest, resident_bytes(process.pid))
            if highest > budget_bytes:
                process.kill()
                process.wait()
                break
            time.sleep(0.02)
        out.seek(0)
        err.seek(0)
        return process.returncode, out.read(), err.read(), highest


if __name__ == "__main__":
    main()

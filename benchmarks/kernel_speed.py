"""Benchmark the packed Triton kernels against fp16 torch on real expert shapes (needs a CUDA GPU).

Dense (one packed linear, ``y = x @ W^T``): fp16 ``F.linear`` vs ``packed_linear_triton`` (and, at 4 bits, torch's
own int4 weight-only matmul ``aten._weight_int4pack_mm`` in bf16, and gemlite when it imports) on Mixtral
4096x14336, Qwen3-30B-A3B 2048x768, DeepSeek-V3 7168x2048 (in x out), batches 1/16/64.
MoE (one layer's routed experts): transformers' ``Qwen3MoeExperts`` with the ``grouped_mm`` and ``batched_mm``
backends in fp16 vs ``PackedExperts`` on the grouped kernel, Qwen3-30B-A3B shape (128 experts, H=2048, I=768, top-8).

Each shape first runs a correctness check (kernel vs torch reference) and prints it. Times are medians over CUDA-event
timed replays of a CUDA graph (``--no-graph`` for eager launches); achieved bandwidth = bytes the op must read/write
/ time, against the card's peak HBM bandwidth. Results go to ``--out`` as JSON and a markdown table.

    python benchmarks/kernels.py --out bench_out            # the full default run (< 8 min on one H100)
    python benchmarks/kernels.py --bits 4 --batches 1 --dense mixtral --moe qwen3
    TRITON_INTERPRET=1 python benchmarks/kernels.py --interpret-smoke   # CPU: tiny shapes, correctness only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DENSE_SHAPES = {  # name: (in_features K, out_features N)
    "mixtral": (4096, 14336),
    "qwen3": (2048, 768),
    "deepseek": (7168, 2048),
}
MOE_SHAPES = {  # name: (experts, hidden H, intermediate I, top_k)
    "qwen3": (128, 2048, 768, 8),
    "mixtral": (8, 4096, 14336, 2),
    "deepseek": (256, 7168, 2048, 8),
}
PEAK_BANDWIDTH_GBS = {"H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H200": 4800.0, "A100": 2039.0}


def peak_bandwidth(device_name: str) -> float | None:
    """Peak HBM GB/s of the card, from its name (None when unknown)."""
    name = device_name.upper()
    if "H200" in name:
        return PEAK_BANDWIDTH_GBS["H200"]
    if "H100" in name:
        if "PCIE" in name:
            return PEAK_BANDWIDTH_GBS["H100 PCIe"]
        if "NVL" in name:
            return PEAK_BANDWIDTH_GBS["H100 NVL"]
        return PEAK_BANDWIDTH_GBS["H100 SXM"]
    if "A100" in name:
        return PEAK_BANDWIDTH_GBS["A100"]
    return None


def time_cuda(fn, iters: int, use_graph: bool) -> tuple[float, str]:
    """Median milliseconds of ``fn()`` over ``iters`` timed runs (CUDA graph replays when possible)."""
    for _ in range(3):  # warm-up: compiles and autotunes before any capture
        fn()
    torch.cuda.synchronize()
    runner, mode = fn, "eager"
    if use_graph:
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            runner, mode = graph.replay, "graph"
        except Exception as error:  # some paths (host syncs) cannot be captured: time them eagerly
            print(f"    (CUDA graph capture failed: {type(error).__name__}: {str(error)[:80]}; timing eagerly)")
            torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        runner()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), mode


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return float((result.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-12))


def gemlite_linear(weight: torch.Tensor, bits: int, group_size: int):
    """A gemlite layer for ``weight [N, K]`` fp16, or the reason it is unavailable."""
    try:
        import gemlite  # noqa: F401
        from gemlite.helper import A16Wn
    except Exception as error:
        return None, f"gemlite not importable: {type(error).__name__}"
    try:
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        linear.weight.data.copy_(weight)
        layer = A16Wn(device=str(weight.device)).from_linear(linear) if bits == 4 else None
        if layer is None:
            return None, f"gemlite: no {bits}-bit helper used here"
        return layer, ""
    except Exception as error:
        return None, f"gemlite failed: {type(error).__name__}: {str(error)[:80]}"


def torch_int4_linear(packed, device: str):
    """torch's int4 weight-only matmul (tinygemm) for a symmetric 4-bit ``PackedLinearWeight``: ``(fn(x bf16), "")``,
    or ``(None, reason)``. Codes ``[-8, 7]`` become ``[0, 15]`` with zero point 8 (``w = (q - 8) * scale``); the
    scales, bf16, go in torch's ``[groups, out, 2]`` scale-and-zero layout."""
    if packed.bits != 4 or not packed.symmetric:
        return None, "torch int4: symmetric 4-bit only"
    try:
        codes = packed.codes().to(torch.int32) + 8  # [out, in]
        scales = packed.scales.to(torch.bfloat16).t()  # [groups, out]
        scale_and_zero = torch.stack([scales, torch.zeros_like(scales)], dim=-1).contiguous().to(device)
        group = packed.effective_group_size
        if device == "cpu":
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 8)
            return (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group, scale_and_zero)), ""
        nibbles = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).to(device)  # two codes a byte, high first
        weight = torch.ops.aten._convert_weight_to_int4pack(nibbles, 8)
        return (lambda x: torch.ops.aten._weight_int4pack_mm(x, weight, group, scale_and_zero)), ""
    except Exception as error:  # the private op's layout moves between torch versions: say so, keep benchmarking
        return None, f"torch int4 unavailable: {type(error).__name__}: {str(error)[:80]}"


def bench_dense(args, device_name: str, peak: float | None) -> list[dict]:
    from moecompress.kernels.reference import packed_linear_reference
    from moecompress.kernels.triton_gemm import packed_linear_triton
    from moecompress.quantization.packing import quantize_rtn

    rows = []
    for shape_name in args.dense:
        in_features, out_features = DENSE_SHAPES[shape_name]
        weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.float16) * 0.02
        for bits in args.bits:
            packed = quantize_rtn(weight, bits, args.group_size, symmetric=not args.asymmetric)
            check_x = torch.randn(8, in_features, device="cuda", dtype=torch.float16)
            error = relative_error(packed_linear_triton(check_x, packed), packed_linear_reference(check_x, packed))
            print(f"[check] dense {shape_name} {in_features}x{out_features} {bits}-bit: rel. error vs torch "
                  f"reference {error:.2e} {'OK' if error < 1e-2 else 'FAIL'}")
            gem_layer, gem_note = gemlite_linear(weight, bits, args.group_size)
            int4_fn, int4_note = torch_int4_linear(packed, "cuda")
            if int4_fn is not None:
                int4_error = relative_error(int4_fn(check_x.to(torch.bfloat16)),
                                            packed_linear_reference(check_x, packed))
                print(f"[check] torch int4 {shape_name}: rel. error vs reference {int4_error:.2e} "
                      f"{'OK' if int4_error < 2e-2 else 'FAIL'}")
            for batch in args.batches:
                x = torch.randn(batch, in_features, device="cuda", dtype=torch.float16)
                fp16_ms, _ = time_cuda(lambda: F.linear(x, weight), args.iters, args.graph)
                ours_ms, mode = time_cuda(lambda: packed_linear_triton(x, packed), args.iters, args.graph)
                activation_bytes = (batch * in_features + batch * out_features) * 2
                ours_bytes = packed.nbytes() + activation_bytes
                fp16_bytes = weight.numel() * 2 + activation_bytes
                row = {
                    "kind": "dense", "shape": shape_name, "in": in_features, "out": out_features, "bits": bits,
                    "group_size": args.group_size, "batch": batch, "rel_error": error, "timing": mode,
                    "fp16_ms": fp16_ms, "ours_ms": ours_ms, "speedup_vs_fp16": fp16_ms / ours_ms,
                    "ours_GBps": ours_bytes / ours_ms / 1e6, "fp16_GBps": fp16_bytes / fp16_ms / 1e6,
                }
                if int4_fn is not None:
                    x_bf16 = x.to(torch.bfloat16)
                    row["torch_int4_ms"], _ = time_cuda(lambda: int4_fn(x_bf16), args.iters, args.graph)
                    row["torch_int4_rel_error"] = int4_error
                    row["speedup_vs_torch_int4"] = row["torch_int4_ms"] / ours_ms
                elif bits == 4:
                    row["torch_int4_note"] = int4_note
                if gem_layer is not None:
                    try:
                        row["gemlite_ms"], _ = time_cuda(lambda: gem_layer(x), args.iters, args.graph)
                    except Exception as gem_error:
                        row["gemlite_note"] = f"gemlite run failed: {type(gem_error).__name__}"
                else:
                    row["gemlite_note"] = gem_note
                if peak:
                    row["ours_pct_peak"] = 100 * row["ours_GBps"] / peak
                    row["fp16_pct_peak"] = 100 * row["fp16_GBps"] / peak
                rows.append(row)
                print(f"  dense {shape_name:8s} b={batch:<3d} {bits}-bit: fp16 {fp16_ms * 1e3:8.1f} us, ours "
                      f"{ours_ms * 1e3:8.1f} us ({row['speedup_vs_fp16']:.2f}x, {row['ours_GBps']:.0f} GB/s"
                      + (f", {row['ours_pct_peak']:.0f}% of peak" if peak else "") + ")"
                      + (f", gemlite {row['gemlite_ms'] * 1e3:.1f} us" if "gemlite_ms" in row else ""))
        del weight
        torch.cuda.empty_cache()
    return rows


def build_fp16_experts(num_experts: int, hidden: int, intermediate: int, top_k: int):
    """A real transformers ``Qwen3MoeExperts`` module in fp16 with random weights."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(
        hidden_size=hidden, moe_intermediate_size=intermediate, num_experts=num_experts, num_experts_per_tok=top_k,
        hidden_act="silu",
    )
    experts = Qwen3MoeExperts(config).to(device="cuda", dtype=torch.float16)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.02)
        experts.down_proj.normal_(0, 0.02)
    return experts, config


def bench_moe(args, device_name: str, peak: float | None) -> list[dict]:
    from moecompress.kernels.backend import PackedExperts
    from moecompress.quantization.packing import quantize_rtn

    rows = []
    for shape_name in args.moe:
        num_experts, hidden, intermediate, top_k = MOE_SHAPES[shape_name]
        experts, config = build_fp16_experts(num_experts, hidden, intermediate, top_k)
        for bits in args.bits:
            started = time.time()
            gate_up = [quantize_rtn(experts.gate_up_proj[e].detach(), bits, args.group_size, not args.asymmetric)
                       for e in range(num_experts)]
            down = [quantize_rtn(experts.down_proj[e].detach(), bits, args.group_size, not args.asymmetric)
                    for e in range(num_experts)]
            packed = PackedExperts(gate_up, down, experts.act_fn, config)
            print(f"  packed {num_experts} experts at {bits} bits in {time.time() - started:.1f} s")
            generator = torch.Generator(device="cuda").manual_seed(0)
            check_tokens = 16
            hidden_states = torch.randn(check_tokens, hidden, device="cuda", dtype=torch.float16, generator=generator)
            index = torch.rand(check_tokens, num_experts, device="cuda", generator=generator).topk(top_k).indices
            weights = torch.rand(check_tokens, top_k, device="cuda", dtype=torch.float16, generator=generator)
            with torch.no_grad():
                error = relative_error(packed.forward_triton(hidden_states, index, weights),
                                       packed.forward_reference(hidden_states, index, weights))
            print(f"[check] moe {shape_name} E={num_experts} H={hidden} I={intermediate} top-{top_k} {bits}-bit: "
                  f"rel. error vs torch reference {error:.2e} {'OK' if error < 1e-2 else 'FAIL'}")
            for batch in args.moe_batches:
                hidden_states = torch.randn(batch, hidden, device="cuda", dtype=torch.float16, generator=generator)
                logits = torch.randn(batch, num_experts, device="cuda", generator=generator)
                top = torch.softmax(logits, -1).topk(top_k)
                index, weights = top.indices, (top.values / top.values.sum(-1, keepdim=True)).half()
                experts_hit = int(index.unique().numel())
                row = {"kind": "moe", "shape": shape_name, "experts": num_experts, "hidden": hidden,
                       "intermediate": intermediate, "top_k": top_k, "bits": bits, "group_size": args.group_size,
                       "batch": batch, "experts_hit": experts_hit, "rel_error": error}
                with torch.no_grad():
                    for backend in args.fp16_backends:
                        config._experts_implementation = backend
                        try:
                            row[f"fp16_{backend}_ms"], _ = time_cuda(
                                lambda: experts(hidden_states, index, weights), args.iters, args.graph)
                        except Exception as backend_error:
                            row[f"fp16_{backend}_note"] = f"{type(backend_error).__name__}: {str(backend_error)[:80]}"
                    row["ours_ms"], row["timing"] = time_cuda(
                        lambda: packed.forward_triton(hidden_states, index, weights), args.iters, args.graph)
                per_expert_packed = (gate_up[0].nbytes() + down[0].nbytes())
                activation_bytes = batch * hidden * 2 * 2 + batch * top_k * (intermediate * 2 * 2 + hidden * 4)
                ours_bytes = experts_hit * per_expert_packed + activation_bytes
                row["ours_GBps"] = ours_bytes / row["ours_ms"] / 1e6
                if peak:
                    row["ours_pct_peak"] = 100 * row["ours_GBps"] / peak
                fp16_times = [row[k] for k in row if k.startswith("fp16_") and k.endswith("_ms")]
                if fp16_times:
                    row["speedup_vs_best_fp16"] = min(fp16_times) / row["ours_ms"]
                rows.append(row)
                fp16_text = ", ".join(f"{b} {row[f'fp16_{b}_ms'] * 1e3:.1f} us" for b in args.fp16_backends
                                      if f"fp16_{b}_ms" in row)
                print(f"  moe {shape_name} b={batch:<3d} {bits}-bit ({experts_hit} experts hit): fp16 [{fp16_text}], "
                      f"ours {row['ours_ms'] * 1e3:.1f} us"
                      + (f" ({row['speedup_vs_best_fp16']:.2f}x vs best fp16" if "speedup_vs_best_fp16" in row else " (")
                      + f", {row['ours_GBps']:.0f} GB/s" + (f", {row['ours_pct_peak']:.0f}% of peak)" if peak else ")"))
            del packed, gate_up, down
            torch.cuda.empty_cache()
        del experts
        torch.cuda.empty_cache()
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = []
    dense = [r for r in rows if r["kind"] == "dense"]
    if dense:
        lines += ["| shape (in x out) | bits | batch | fp16 F.linear us | torch int4 us | ours us | speedup vs fp16 | "
                  "ours GB/s | % peak | gemlite us |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in dense:
            gem = f"{r['gemlite_ms'] * 1e3:.1f}" if "gemlite_ms" in r else "-"
            int4 = f"{r['torch_int4_ms'] * 1e3:.1f}" if "torch_int4_ms" in r else "-"
            lines.append(f"| {r['shape']} {r['in']}x{r['out']} | {r['bits']} | {r['batch']} | {r['fp16_ms'] * 1e3:.1f} | "
                         f"{int4} | {r['ours_ms'] * 1e3:.1f} | {r['speedup_vs_fp16']:.2f}x | {r['ours_GBps']:.0f} | "
                         f"{r.get('ours_pct_peak', float('nan')):.0f} | {gem} |")
    moe = [r for r in rows if r["kind"] == "moe"]
    if moe:
        lines += ["", "| MoE layer | bits | tokens | experts hit | fp16 grouped_mm us | fp16 batched_mm us | ours us | "
                  "speedup vs best fp16 | ours GB/s | % peak |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in moe:
            def cell(key):
                return f"{r[key] * 1e3:.1f}" if key in r else "-"
            lines.append(f"| {r['shape']} E={r['experts']} H={r['hidden']} I={r['intermediate']} top-{r['top_k']} | "
                         f"{r['bits']} | {r['batch']} | {r['experts_hit']} | {cell('fp16_grouped_mm_ms')} | "
                         f"{cell('fp16_batched_mm_ms')} | {r['ours_ms'] * 1e3:.1f} | "
                         f"{r.get('speedup_vs_best_fp16', float('nan')):.2f}x | {r['ours_GBps']:.0f} | "
                         f"{r.get('ours_pct_peak', float('nan')):.0f} |")
    return "\n".join(lines) + "\n"


def interpret_smoke() -> int:
    """CPU correctness smoke run through Triton's interpreter (tiny shapes; no timings)."""
    from moecompress.kernels.reference import packed_linear_reference
    from moecompress.kernels.runtime import interpreting
    from moecompress.kernels.triton_gemm import packed_linear_triton
    from moecompress.quantization.packing import quantize_rtn

    if not interpreting():
        print("--interpret-smoke needs TRITON_INTERPRET=1 in the environment (set before Python starts)")
        return 2
    for bits in (2, 3, 4, 8):
        weight = quantize_rtn(torch.randn(48, 96), bits, 32)
        x = torch.randn(3, 96)
        error = relative_error(packed_linear_triton(x, weight), packed_linear_reference(x, weight))
        print(f"[check] interpreter dense 96x48 {bits}-bit: rel. error {error:.2e} {'OK' if error < 1e-4 else 'FAIL'}")
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", type=lambda s: s.split(","), default=list(DENSE_SHAPES),
                        help=f"dense shapes, comma separated, of {list(DENSE_SHAPES)}; empty string for none")
    parser.add_argument("--moe", type=lambda s: [x for x in s.split(",") if x], default=["qwen3"],
                        help=f"MoE layer shapes of {list(MOE_SHAPES)} (default qwen3)")
    parser.add_argument("--bits", type=lambda s: [int(x) for x in s.split(",")], default=[4, 8])
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    parser.add_argument("--moe-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--asymmetric", action="store_true", help="asymmetric (zero point) quantisation")
    parser.add_argument("--fp16-backends", type=lambda s: s.split(","), default=["grouped_mm", "batched_mm"])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--no-graph", dest="graph", action="store_false", help="time eager launches, not graphs")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and results.md")
    parser.add_argument("--interpret-smoke", action="store_true", help="CPU interpreter correctness smoke run")
    args = parser.parse_args(argv)
    args.dense = [s for s in args.dense if s]
    for name in args.dense:
        if name not in DENSE_SHAPES:
            parser.error(f"unknown dense shape {name!r}; choose from {list(DENSE_SHAPES)}")
    for name in args.moe:
        if name not in MOE_SHAPES:
            parser.error(f"unknown MoE shape {name!r}; choose from {list(MOE_SHAPES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.interpret_smoke:
        return interpret_smoke()
    from moecompress.kernels.runtime import interpreting

    if not torch.cuda.is_available() or interpreting():
        print("benchmarks/kernels.py times CUDA kernels and needs a CUDA GPU (with TRITON_INTERPRET unset). "
              "On CPU run it with TRITON_INTERPRET=1 ... --interpret-smoke for a correctness smoke run.")
        return 0
    device_name = torch.cuda.get_device_name()
    peak = peak_bandwidth(device_name)
    print(f"device: {device_name}; peak HBM bandwidth: {peak or 'unknown'} GB/s; torch {torch.__version__}")
    started = time.time()
    rows = bench_dense(args, device_name, peak) + bench_moe(args, device_name, peak)
    table = markdown_table(rows)
    print(table)
    print(f"total {time.time() - started:.0f} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"device": device_name, "peak_GBps": peak, "torch": torch.__version__, "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        (args.out / "results.md").write_text(f"Device: {device_name} (peak {peak} GB/s)\n\n" + table)
        print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

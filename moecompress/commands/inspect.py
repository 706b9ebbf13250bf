"""``moecompress inspect MODEL [--json]``: what an MoE checkpoint is made of, without loading its weights.

The model is built from its config on the ``meta`` device (shapes only, no memory, no weight reads), so a
checkpoint of any size is described in seconds; its safetensors files are still checked (headers only), so a
corrupt checkpoint is reported here rather than halfway through a compression run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.table import Table

from moecompress.analysis.camera import STATISTICS, energy_plot, layer_energies, summarize
from moecompress.calibration import LayerwiseRunner, collect_statistics, load_calibration
from moecompress.checkpoint.headers import checkpoint_bytes
from moecompress.checkpoint.native import build_meta_model
from moecompress.checkpoint.validation import (
    is_compressed_tensors,
    load_config,
    local_checkpoint_folder,
    validate_safetensors,
)
from moecompress.errors import CalibrationError
from moecompress.models.families import adapter_for
from moecompress.models.summary import model_summary


def inspect_checkpoint(source: str) -> dict:
    """``model_summary`` of the checkpoint at ``source`` (folder or hub id) plus ``source``, ``dtype`` and
    ``bytes_on_disk``.

    ``bytes`` is the model in memory at the load dtype (``dtype``), each tensor at the dtype transformers keeps it
    in (some routers stay float32); ``bytes_on_disk`` (``{"total", "by_dtype", "parameters"}``, None for a hub
    id) is what the safetensors files store, from their headers.
    """
    config = load_config(source)
    adapter_for(config)  # dense / unknown families fail here with the supported list
    local = local_checkpoint_folder(source)
    if local is not None:
        validate_safetensors(local)
    dtype = _checkpoint_dtype(config)
    model = build_meta_model(config, dtype)  # a native (quantised) checkpoint gets its packed structure
    summary = model_summary(model)
    on_disk = checkpoint_bytes(local) if local is not None else None
    result = {"source": str(source), "dtype": str(dtype).removeprefix("torch."), **summary, "bytes_on_disk": on_disk}
    if is_compressed_tensors(config):  # described as the model it decompresses to, plus its compression
        result["compressed_tensors"] = compressed_tensors_summary(config.quantization_config)
    return result


def compressed_tensors_summary(quantization: dict) -> dict:
    """A compressed-tensors ``quantization_config``: its format, per config group the weights' scheme and the
    number of targets, and how many modules it ignores."""
    groups = []
    for name, group in (quantization.get("config_groups") or {}).items():
        weights = group.get("weights") or {}
        groups.append({"group": name, "bits": weights.get("num_bits"), "type": weights.get("type"),
                       "strategy": weights.get("strategy"), "group_size": weights.get("group_size"),
                       "symmetric": weights.get("symmetric"), "targets": len(group.get("targets") or [])})
    return {"format": "compressed-tensors", "compression": quantization.get("format"), "groups": groups,
            "ignored": len(quantization.get("ignore") or [])}


def expert_usage(source: str, calibration_files: list[str], *, num_samples: int, seq_len: int, seed: int = 0) -> list[dict]:
    """Per MoE layer, how calibration tokens spread over its experts (one lazy layer-by-layer pass).

    Returns one row per MoE layer: ``layer``, ``expert_token_counts`` (routed tokens per expert), ``max_share`` and
    ``min_share`` (share of routed slots of the most- and least-used expert) and ``unused_experts``.
    """
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    calibration = load_calibration(tokenizer, files=calibration_files, num_samples=num_samples, seq_len=seq_len, seed=seed)
    statistics = collect_statistics(source, calibration, ["expert_token_counts"])
    rows = []
    for layer, layer_statistics in sorted(statistics.items()):
        counts = layer_statistics["expert_token_counts"].double()
        total = max(float(counts.sum()), 1.0)
        rows.append({
            "layer": layer,
            "expert_token_counts": [int(count) for count in counts.tolist()],
            "max_share": float(counts.max()) / total,
            "min_share": float(counts.min()) / total,
            "unused_experts": int((counts == 0).sum()),
        })
    return rows


def micro_expert_energies(source: str, calibration_files: list[str], *, num_samples: int, seq_len: int,
                          alpha: float = 0.9, plot_path: str | None = None, seed: int = 0) -> dict:
    """CAMERA micro-expert energies per MoE layer (one lazy layer-by-layer pass; moecompress.analysis.camera).

    Returns ``{"alpha", "layers": [summarize(...) per layer], "plot"}``: quantiles of the energies, the share of
    the layer's energy held by its lowest 20/40/60% micro-experts, per-expert and shared shares; the plot (cumulative
    energy share per layer) is written to ``plot_path`` when given.
    """
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    calibration = load_calibration(tokenizer, files=calibration_files, num_samples=num_samples, seq_len=seq_len, seed=seed)
    energies = []

    def on_layer(layer_index, layer, collectors):  # while the layer's weights are loaded (down-column norms)
        for collector in collectors:
            energies.append(layer_energies(collector.view, collector.result(), alpha))

    LayerwiseRunner.from_source(source).run(calibration, list(STATISTICS), layer_callback=on_layer)
    plot = str(energy_plot(energies, Path(plot_path))) if plot_path else None
    return {"alpha": alpha, "layers": [summarize(layer) for layer in energies], "plot": plot}


def _checkpoint_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def render(summary: dict, console=None) -> None:
    """Print ``summary`` as readable tables (per MoE layer, then parameters and bytes)."""
    console = console or Console(width=None if sys.stdout.isatty() else 120)
    dense = summary["dense_layers"]
    layers = Table(
        title=f"{summary['source']}: {summary['family']} ({summary['model_type']}), {summary['num_layers']} layers, "
        f"dense layers: {dense if dense else 'none'}"
    )
    for column in ("layer", "experts", "top-k", "scoring", "renorm", "groups", "scale", "shared", "I", "routed params"):
        layers.add_column(column, justify="right")
    for row in summary["moe_layers"]:
        groups = f"{row['topk_group']}/{row['n_group']}" if row["n_group"] > 1 else "-"
        experts = str(row["num_experts"])
        if row["router_outputs"] != row["num_experts"]:
            experts += f" (router {row['router_outputs']})"
        layers.add_row(
            str(row["layer"]),
            experts,
            str(row["top_k"]),
            row["scoring"],
            "yes" if row["renormalize"] else "no",
            groups,
            f"{row['routed_scaling_factor']:g}",
            str(row["num_shared_experts"]),
            str(row["expert_intermediate_size"]),
            f"{row['routed_expert_params']:,}",
        )
    console.print(layers)
    totals = Table(title=f"parameters and bytes in memory ({summary['dtype']})")
    for column in ("part", "parameters", "share", "bytes"):
        totals.add_column(column, justify="right")
    total = max(summary["parameters"]["total"], 1)
    for part in ("routed_experts", "shared_experts", "other", "total"):
        count = summary["parameters"][part]
        totals.add_row(part.replace("_", " "), f"{count:,}", f"{100 * count / total:.1f}%", _human_bytes(summary["bytes"][part]))
    console.print(totals)
    on_disk = summary.get("bytes_on_disk")
    if on_disk:
        dtypes = ", ".join(f"{name} {_human_bytes(size)}" for name, size in on_disk["by_dtype"].items())
        console.print(f"on disk (safetensors): {_human_bytes(on_disk['total'])} ({dtypes})")
    compressed = summary.get("compressed_tensors")
    if compressed:
        groups = "; ".join(f"{group['group']}: {group['bits']}-bit {group['strategy']}"
                           + (f" {group['group_size']}" if group["group_size"] else "")
                           + (" symmetric" if group["symmetric"] else " asymmetric") + f" ({group['targets']} target(s))"
                           for group in compressed["groups"])
        console.print(f"compressed-tensors {compressed['compression']} (read decompressed): {groups}; "
                      f"{compressed['ignored']} module(s) ignored")
    if summary.get("expert_usage"):
        usage = Table(title="expert usage on the calibration text (share of routed tokens)")
        for column in ("layer", "most-used expert", "least-used expert", "uniform share", "unused experts"):
            usage.add_column(column, justify="right")
        for row in summary["expert_usage"]:
            uniform = 1.0 / max(len(row["expert_token_counts"]), 1)
            usage.add_row(str(row["layer"]), f"{row['max_share']:.1%}", f"{row['min_share']:.1%}", f"{uniform:.1%}",
                          str(row["unused_experts"]))
        console.print(usage)
    if summary.get("micro_experts"):
        micro = summary["micro_experts"]
        table = Table(title=f"CAMERA micro-expert energies (alpha {micro['alpha']:g}): share of the layer's energy in "
                      "its lowest-energy micro-experts")
        for column in ("layer", "micro-experts", "zero", "median", "max", "lowest 20%", "lowest 40%", "lowest 60%",
                       "top expert", "shared"):
            table.add_column(column, justify="right")
        for row in micro["layers"]:
            shares = row["lowest_share"]
            table.add_row(str(row["layer"]), str(row["micro_experts"]), str(row["zero_energy"]),
                          f"{row['quantiles']['median']:.3g}", f"{row['quantiles']['max']:.3g}", f"{shares['20%']:.2%}",
                          f"{shares['40%']:.2%}", f"{shares['60%']:.2%}", f"{max(row['expert_energy_share']):.1%}",
                          ", ".join(f"{share:.1%}" for share in row["shared_energy_share"]) or "-")
        console.print(table)
        if micro.get("plot"):
            console.print(f"plot: {micro['plot']}")


def _human_bytes(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


def run(args: argparse.Namespace) -> int:
    summary = inspect_checkpoint(args.model)
    if args.calib:
        summary["expert_usage"] = expert_usage(args.model, args.calib, num_samples=args.num_samples, seq_len=args.seq_len)
    if args.micro:
        if not args.calib:
            raise CalibrationError("inspect --micro needs calibration text; add --calib FILES (or --calib bundled)")
        summary["micro_experts"] = micro_expert_energies(args.model, args.calib, num_samples=args.num_samples,
                                                         seq_len=args.seq_len, alpha=args.alpha, plot_path=args.plot)
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render(summary)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show the MoE structure of a checkpoint (experts, routing, parameter counts)",
        description="Describe each MoE layer of a checkpoint folder or hub id: experts, top-k, scoring, "
        "renormalisation, shared experts, expert intermediate size, and where the parameters and bytes are.",
    )
    parser.add_argument("model", help="checkpoint folder or hub id")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--calib", nargs="+", metavar="FILE",
                        help="calibration .jsonl/.txt files or folders (or 'bundled'): adds expert usage per layer")
    parser.add_argument("--num-samples", type=int, default=32, help="calibration sequences for --calib (default 32)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence (default 256)")
    parser.add_argument("--micro", action="store_true",
                        help="with --calib: CAMERA micro-expert energies per layer (distribution, lowest 20/40/60%%, plot)")
    parser.add_argument("--alpha", type=float, default=0.9, help="--micro: weight of the max term (default 0.9)")
    parser.add_argument("--plot", default="camera_energies.png", help="--micro: where the plot goes "
                        "(default camera_energies.png)")
    parser.set_defaults(func=run)

"""``moecompress inspect MODEL [--json]``: what an MoE checkpoint is made of, without loading its weights.

The model is built from its config on the ``meta`` device (shapes only, no memory, no weight reads), so a
checkpoint of any size is described in seconds; its safetensors files are still checked (headers only), so a
corrupt checkpoint is reported here rather than halfway through a compression run.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import transformers

from moecompress.models.families import adapter_for
from moecompress.models.loading import _local_folder, load_config, validate_safetensors
from moecompress.models.summary import model_summary


def inspect_checkpoint(source: str) -> dict:
    """``model_summary`` of the checkpoint at ``source`` (folder or hub id) plus ``source`` and ``dtype``."""
    config = load_config(source)
    adapter_for(config)  # dense / unknown families fail here with the supported list
    local = _local_folder(source)
    if local is not None:
        validate_safetensors(local)
    dtype = _checkpoint_dtype(config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    summary = model_summary(model)
    return {"source": str(source), "dtype": str(dtype).removeprefix("torch."), **summary}


def _checkpoint_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def render(summary: dict, console=None) -> None:
    """Print ``summary`` as readable tables (per MoE layer, then parameters and bytes)."""
    from rich.console import Console
    from rich.table import Table

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
    totals = Table(title=f"parameters and bytes ({summary['dtype']})")
    for column in ("part", "parameters", "share", "bytes"):
        totals.add_column(column, justify="right")
    total = max(summary["parameters"]["total"], 1)
    for part in ("routed_experts", "shared_experts", "other", "total"):
        count = summary["parameters"][part]
        totals.add_row(part.replace("_", " "), f"{count:,}", f"{100 * count / total:.1f}%", _human_bytes(summary["bytes"][part]))
    console.print(totals)


def _human_bytes(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


def run(args: argparse.Namespace) -> int:
    summary = inspect_checkpoint(args.model)
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
    parser.set_defaults(func=run)

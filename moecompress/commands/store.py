"""``moecompress store build MODEL --tasks NAME=FILES ... --out DIR`` and ``moecompress store show DIR``.

A pattern store (PreMoe TAER, ``moecompress.pruning.retrieval``) holds one TCESS matrix ``[L_moe, E]`` per task,
each from one calibration pass over that task's text, plus the model fingerprint, the TCESS options, the default key
layers and the super experts. ``moecompress retrieve`` uses it to pick the pattern nearest a prompt.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from moecompress.checkpoint.validation import resolve_checkpoint
from moecompress.commands.arguments import device_name, positive_int
from moecompress.pruning.retrieval import (
    TCESS_PRESETS,
    PatternStore,
    RetrievalError,
    TcessOptions,
    build_pattern_store,
    check_output_folder,
    parse_task_spec,
    store_files,
)


def parse_layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise RetrievalError(f"--key-layers must be comma-separated decoder-layer indices such as 1 or 1,2 (got {text!r})") from None


def tcess_options(args: argparse.Namespace) -> TcessOptions:
    """The preset, with any of --tcess-top-k / --tcess-threshold / --tcess-phi overriding it."""
    values = dict(TCESS_PRESETS[args.preset])
    if args.tcess_top_k is not None:
        values["top_k"] = args.tcess_top_k
    if args.tcess_threshold is not None:
        values["threshold"] = args.tcess_threshold
    if args.tcess_phi is not None:
        values["phi"] = args.tcess_phi
    return TcessOptions(**values)


def run_build(args: argparse.Namespace) -> int:
    tasks: dict[str, list[str]] = {}
    for spec in args.tasks:
        name, files = parse_task_spec(spec)
        if name in tasks:
            raise RetrievalError(f"task {name!r} is given twice in --tasks; give each task once (files comma-separated)")
        tasks[name] = files
    inputs = [("input model folder", resolve_checkpoint(args.model))]
    inputs += [(f"text of task {name}", path) for name, files in tasks.items() for path in files]
    # before any profiling: never an input, and --overwrite replaces only a pattern store holding nothing else
    check_output_folder(args.out, inputs, overwrite=args.overwrite, owned_files=store_files, what="pattern store")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    store = build_pattern_store(
        args.model, tasks, num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed,
        tcess=tcess_options(args), key_layers=parse_layers(args.key_layers), dtype=dtype, device=args.device,
        on_task=lambda task, index, total: print(f"[{index + 1}/{total}] profiling task {task}", file=sys.stderr),
    )
    folder = store.save(args.out, overwrite=args.overwrite)
    print(f"pattern store with {len(store.patterns)} tasks ({', '.join(store.task_names)}) written to {folder}")
    print(f"key layers {store.key_layers}; super experts {store.super_experts}; TCESS {store.tcess.to_dict()}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    store = PatternStore.load(args.store)
    record = store.describe()
    if args.json:
        json.dump(record, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{args.store}: {len(store.patterns)} task patterns, MoE layers {store.moe_layers}, "
          f"{record['num_experts']} experts, key layers {store.key_layers}")
    print(f"TCESS {store.tcess.to_dict()}; super experts {store.super_experts}; model {store.fingerprint[:16]}...")
    for task, info in store.tasks.items():
        print(f"  {task}: {info['num_tokens']} tokens from {', '.join(info['files'])}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "store",
        help="build or show a PreMoe task-pattern store (for `moecompress retrieve`)",
        description="Task-pattern stores for task-adaptive expert retrieval (PreMoe TAER).",
    )
    parser.set_defaults(func=lambda args: parser.print_help() or 1)  # `moecompress store` alone: its own help
    actions = parser.add_subparsers(dest="store_command", metavar="ACTION")
    build = actions.add_parser(
        "build",
        help="profile each task's text and save one TCESS pattern per task",
        description="One calibration pass per task (layer by layer, lazily from the checkpoint) records the TCESS "
                    "matrix [MoE layers, experts] of that task; the store keeps them with the model fingerprint, the "
                    "options and the super experts, written atomically into --out.",
    )
    build.add_argument("model", help="model folder or hub id (the original, unpruned checkpoint)")
    build.add_argument("--tasks", nargs="+", required=True, metavar="NAME=FILES",
                       help="one per task: NAME=FILE[,FILE...] (.jsonl with a `text` field, .txt, or folders)")
    build.add_argument("--out", required=True, help="store folder to write (beside or apart from the checkpoint)")
    build.add_argument("--num-samples", type=positive_int, default=64,
                       help="calibration sequences per task (default 64)")
    build.add_argument("--seq-len", type=positive_int, default=256,
                       help="tokens per sequence (default 256; at most the model's context)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--preset", default="recommended", choices=sorted(TCESS_PRESETS),
                       help="TCESS options: recommended (k = model top-k, r = 0, phi = max(s, sigmoid(s))) or "
                            "premoe_code (k = 1, no filter, raw logit)")
    build.add_argument("--tcess-top-k", type=positive_int, default=None,
                       help="override the preset's marker top-k (1 to the model's experts per layer)")
    build.add_argument("--tcess-threshold", type=float, default=None, help="override the preset's threshold r")
    build.add_argument("--tcess-phi", choices=["identity", "peu"], default=None, help="override the preset's phi")
    build.add_argument("--key-layers", default=None,
                       help="default MoE layers whose TCESS forms the matching key, e.g. 1 or 1,2 (default: first MoE layer)")
    build.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                       help="compute dtype of the calibration passes (default: the checkpoint's)")
    build.add_argument("--device", default=None, type=device_name, help="compute device (default: cpu)")
    build.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    build.add_argument("--overwrite", action="store_true",
                       help="replace a pattern store in --out (never a folder of other content)")
    build.set_defaults(func=run_build)
    show = actions.add_parser("show", help="describe a pattern store", description="Tasks, layers and options of a store.")
    show.add_argument("store", help="store folder")
    show.add_argument("--json", action="store_true", help="print store.json")
    show.set_defaults(func=run_show)

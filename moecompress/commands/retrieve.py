"""``moecompress retrieve MODEL --store DIR --prompt TEXT [--keep N] [--out DIR]``: PreMoe task-adaptive retrieval.

Scores the prompt at the store's key layers (the model runs only up to the last key layer's router), picks the
nearest task pattern, and builds the reduced model reading only the kept experts' tensors from the safetensors
files. Prints the choice, the distances and the bytes read against the full checkpoint; with ``--out`` the reduced
model is saved (loadable by plain ``from_pretrained``) with ``retrieval.json`` beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from moecompress.checkpoint.loading import non_finite_tensors
from moecompress.checkpoint.validation import resolve_checkpoint
from moecompress.commands.arguments import device_name, positive_int
from moecompress.commands.store import parse_layers
from moecompress.folders import move_into_place, new_work_folder, read_json
from moecompress.pruning.retrieval import RetrievalError, check_output_folder, retrieve

RECORD_FILE = "retrieval.json"
MAX_PROMPT_FILE_BYTES = 64 << 20  # far beyond any model's context; the exact bound is the context (PromptScorer)


def save_reduced_model(model, tokenizer, record: dict, out: Path) -> dict:
    """``save_pretrained`` + tokenizer + ``retrieval.json`` (listing every file written, so that ``--overwrite``
    later replaces only those) into a new work folder beside ``out``, then moved into place in one rename."""
    out = out.expanduser().resolve()
    bad = non_finite_tensors(model)
    if bad:  # never save a model with NaN/inf in it
        raise RetrievalError(f"the reduced model holds NaN or infinite values ({', '.join(bad[:3])}); the checkpoint "
                             f"{record.get('model')} is damaged: re-download or re-save it. Nothing was saved.")
    partial = new_work_folder(out.parent, f".{out.name}.partial-")
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        files = sorted(str(path.relative_to(partial)) for path in partial.rglob("*") if not path.is_dir())
        record = {**record, "files": [*files, RECORD_FILE]}
        (partial / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        move_into_place(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return record


def reduced_model_files(folder: Path) -> set[str] | None:
    """The files an earlier ``retrieve --out`` wrote into ``folder`` (its ``retrieval.json`` lists them), or None
    when ``folder`` is not such an output."""
    files = (read_json(Path(folder) / RECORD_FILE) or {}).get("files")
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        return None
    return set(files) | {RECORD_FILE}


def read_prompt_file(path: str) -> str:
    try:
        size = Path(path).stat().st_size
        if size > MAX_PROMPT_FILE_BYTES:
            raise RetrievalError(f"--prompt-file {path} is {size} bytes, far more than any model's context holds; give "
                                 "a prompt file of what you would type (its first part)")
        return Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise RetrievalError(f"cannot read --prompt-file {path} ({error.strerror}); check the path") from None
    except UnicodeDecodeError:
        raise RetrievalError(f"--prompt-file {path} is not UTF-8 text; give a text file") from None


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


def run(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.prompt_file is None):
        raise RetrievalError("give the prompt with exactly one of --prompt TEXT or --prompt-file FILE")
    prompt = args.prompt if args.prompt_file is None else read_prompt_file(args.prompt_file)
    folder = resolve_checkpoint(args.model)
    if args.out is not None:
        inputs = [("input model folder", folder), ("pattern store", Path(args.store))]
        if args.prompt_file is not None:
            inputs.append(("prompt file", Path(args.prompt_file)))
        check_output_folder(args.out, inputs, overwrite=args.overwrite, owned_files=reduced_model_files,
                            what="reduced model (an earlier `moecompress retrieve --out`)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep is not None and args.keep_ratio is not None:
        raise RetrievalError("give at most one of --keep and --keep-ratio")
    keep_ratio = args.keep_ratio if args.keep_ratio is not None else (None if args.keep is not None else 0.5)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tokenizer, retrieval = retrieve(
        folder, args.store, prompt, num_experts_to_keep=args.keep, keep_ratio=keep_ratio,
        top_k=args.top_k, key_layers=parse_layers(args.key_layers), dtype=dtype, device=args.device or "cpu")
    record = {"model": str(args.model), "store": str(args.store), **retrieval.to_dict()}
    if args.out is not None:
        record = save_reduced_model(model, tokenizer, record, Path(args.out))
    if args.json:
        json.dump(record, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    total = retrieval.query_bytes + retrieval.build_bytes
    full = retrieval.total_checkpoint_bytes
    kept_counts = sorted({len(kept) for kept in retrieval.kept_experts.values()})
    print(f"task pattern: {retrieval.task}")
    print("L2 distance to each pattern: " + ", ".join(
        f"{task} {distance:.4f}" for task, distance in sorted(retrieval.distances.items(), key=lambda item: item[1])))
    print(f"kept experts per MoE layer: {kept_counts[0] if len(kept_counts) == 1 else kept_counts} "
          f"({retrieval.experts_read} experts read)")
    print(f"bytes read: query {_human(retrieval.query_bytes)} + build {_human(retrieval.build_bytes)} = {_human(total)} "
          f"of {_human(full)} ({100 * total / max(full, 1):.1f}% of the checkpoint)")
    if args.out is not None:
        print(f"reduced model saved to {args.out} (retrieval.json beside it)")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "retrieve",
        help="build a task-specific reduced model for a prompt from a pattern store (PreMoe TAER)",
        description="Score the prompt at the store's key layers, choose the nearest task pattern, and build the model "
                    "keeping each layer's super experts and top-K experts of that pattern, reading only those experts "
                    "from the safetensors files.",
    )
    parser.add_argument("model", help="model folder or hub id (the checkpoint the store was built from)")
    parser.add_argument("--store", required=True, help="pattern store folder (`moecompress store build`)")
    parser.add_argument("--prompt", default=None, help="the prompt text")
    parser.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    parser.add_argument("--keep", type=positive_int, default=None, help="experts kept per MoE layer")
    parser.add_argument("--keep-ratio", type=float, default=None, help="fraction of experts kept (default 0.5)")
    parser.add_argument("--top-k", type=positive_int, default=None, help="experts per token after pruning (default: unchanged, "
                                                                "capped at the kept count)")
    parser.add_argument("--key-layers", default=None, help="MoE layers to match on, e.g. 1,2 (default: the store's)")
    parser.add_argument("--out", default=None, help="save the reduced model here (plain from_pretrained loads it)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a reduced model an earlier retrieve wrote in --out (never other content)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="dtype of the reduced model (default: the checkpoint's)")
    parser.add_argument("--device", default=None, type=device_name, help="device of the reduced model (default: cpu)")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    parser.add_argument("--json", action="store_true", help="print the decision and bytes as JSON")
    parser.set_defaults(func=run)

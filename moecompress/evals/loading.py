"""Load a checkpoint for evaluation: fp32 by default (bf16 matmuls on CPU are slow and noisy), eager experts, with a
tokenizer, on one device or spread over several (:mod:`moecompress.checkpoint.placement`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from moecompress.checkpoint.loading import load_model
from moecompress.checkpoint.native import build_meta_model
from moecompress.checkpoint.placement import Placement, plan_placement
from moecompress.checkpoint.validation import resolve_checkpoint
from moecompress.errors import CheckpointError

EVAL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model_for_eval(source: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        device_map: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``source`` (folder or hub id), read-only, in eval mode on ``device``; with
    ``--device cuda`` a model larger than one GPU (or any model, given ``device_map``) is spread over the GPUs and
    the CPU (:func:`moecompress.checkpoint.placement.plan_placement`).

    Raises :class:`CheckpointError` when the checkpoint has no tokenizer (evaluation needs one to encode tasks).
    """
    placement = eval_placement(source, device=device, dtype=dtype, device_map=device_map)
    model, tokenizer = load_model(source, dtype=dtype, device=placement.device or "cpu",
                                  experts_implementation="eager", device_map=placement.device_map)
    if tokenizer is None:
        raise CheckpointError(
            f"{source} has no tokenizer files; evaluation needs one. Save the tokenizer into the checkpoint folder "
            "(tokenizer.save_pretrained(folder))."
        )
    return model, tokenizer


def eval_placement(source: str | Path, *, device: str, dtype: torch.dtype, device_map: str | None = None,
                   free_memory: list[int] | None = None, cpu_memory: int | None = None) -> Placement:
    """Where ``source`` goes for evaluation, decided on its meta skeleton at ``dtype`` (no weight read)."""
    if torch.device(device).type != "cuda" and device_map is None:
        return Placement(device)
    config = AutoConfig.from_pretrained(str(resolve_checkpoint(source)))
    return plan_placement(build_meta_model(config, dtype=dtype), device, device_map=device_map,
                          free_memory=free_memory, cpu_memory=cpu_memory)

"""Load a checkpoint for evaluation: fp32 (bf16 matmuls on CPU are slow and noisy), eager experts, with a tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moecompress.checkpoint.loading import load_model
from moecompress.errors import CheckpointError


def load_model_for_eval(source: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``source`` (folder or hub id), read-only, in eval mode on ``device``.

    Raises :class:`CheckpointError` when the checkpoint has no tokenizer (evaluation needs one to encode tasks).
    """
    model, tokenizer = load_model(source, dtype=dtype, device=device, experts_implementation="eager")
    if tokenizer is None:
        raise CheckpointError(
            f"{source} has no tokenizer files; evaluation needs one. Save the tokenizer into the checkpoint folder "
            "(tokenizer.save_pretrained(folder))."
        )
    return model, tokenizer

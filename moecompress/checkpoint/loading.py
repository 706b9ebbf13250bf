"""Load an MoE checkpoint (a local folder or a hub id) as a model, with clear errors, never writing into the source.

The checkpoint is validated first (:mod:`moecompress.checkpoint.validation`: family, files, headers, weights against
the config); the model then loads, and a load that leaves any weight newly initialised is an error; it must have MoE
blocks. Models a remap merge saved with :func:`moecompress.models.edits.materialize_expert_id_map` are compacted again
after loading, and the MC-MoE ODP settings the config records are installed (:mod:`moecompress.kernels.odp`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from moecompress.checkpoint.headers import first_names
from moecompress.checkpoint.validation import (
    has_tokenizer_files,
    load_config,
    local_checkpoint_folder,
    validate_checkpoint,
)
from moecompress.errors import CheckpointError
from moecompress.kernels.odp import apply_odp_from_config
from moecompress.models.edits import restore_expert_id_map
from moecompress.models.families import adapter_for, find_moe_blocks


def load_model(
    source: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    experts_implementation: str = "eager",
    odp: bool = True,
    device_map: dict | None = None,
):
    """Load ``source`` (folder or hub id) as a causal LM. Returns ``(model, tokenizer)``, model in eval mode.

    ``device_map`` (module path -> GPU index or ``"cpu"``, :func:`moecompress.checkpoint.placement.plan_placement`)
    spreads the model over several devices (accelerate) instead of putting it whole on ``device``.

    ``odp``: apply the MC-MoE online dynamic pruning the checkpoint's config records (``mcmoe_odp``); False (or the
    environment variable ``MOECOMPRESS_ODP=0``) runs every routed expert.

    ``tokenizer`` is None when a local folder has no tokenizer files (e.g. a tiny test model). Raises
    :class:`CheckpointError` for a missing folder, a missing ``config.json``, a missing or corrupt safetensors
    file, and :class:`UnsupportedModelError` for a dense model or an MoE family without an adapter.
    """
    config = load_config(source)
    adapter_for(config)  # a dense or unknown model fails here, before any weight is read
    local = local_checkpoint_folder(source)
    if local is not None:
        validate_checkpoint(local, config)
    try:
        model, loading_info = transformers.AutoModelForCausalLM.from_pretrained(
            str(source), dtype=dtype, experts_implementation=experts_implementation, device_map=device_map,
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"could not load the weights of {source}: {error}. Check that the checkpoint is complete and was saved "
            "by transformers (or by moecompress's export)."
        ) from error
    _refuse_newly_initialised_weights(source, loading_info)
    if device_map is None:
        model.to(device)
    model.eval()
    find_moe_blocks(model)  # a config that claims MoE but built no MoE block (e.g. num_experts=0) fails here
    restore_expert_id_map(model)
    apply_odp_from_config(model, odp)
    return model, _load_tokenizer(source, local)


def _refuse_newly_initialised_weights(source, loading_info: dict) -> None:
    """transformers initialises a weight the checkpoint lacks (or holds with another shape) at random and only logs
    it; a model with random weights must never be scored or compressed, so that is an error here."""
    missing = sorted(loading_info.get("missing_keys") or ())
    mismatched = sorted(str(entry[0] if isinstance(entry, (tuple, list)) else entry)
                        for entry in loading_info.get("mismatched_keys") or ())
    if missing or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} weight(s) missing from the checkpoint ({first_names(missing)})")
        if mismatched:
            problems.append(f"{len(mismatched)} weight(s) with another shape than the config gives ({first_names(mismatched)})")
        raise CheckpointError(
            f"loading {source} would leave weights newly initialised: {'; '.join(problems)}. The checkpoint is "
            "incomplete or its config.json names another architecture than its weights; re-save or re-download it."
        )


def _load_tokenizer(source: str | Path, local: Path | None):
    if local is not None and not has_tokenizer_files(local):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"the tokenizer of {source} cannot be loaded: {error}") from error

"""Load an MoE checkpoint (a local folder or a hub id) as a model, with clear errors, never writing into the source.

The checkpoint is validated first (:mod:`moecompress.checkpoint.validation`: family, files, headers, weights against
the config); the model then loads, and a load that leaves any weight newly initialised, or any floating-point weight,
scale or norm that is NaN or infinite, is an error; it must have MoE blocks (a compressed-tensors folder loads
decompressed, through :func:`load_compressed_tensors`). Models a remap merge saved with
:func:`moecompress.models.edits.materialize_expert_id_map` are compacted again
after loading, and the MC-MoE ODP settings the config records are installed (:mod:`moecompress.kernels.odp`).
"""

from __future__ import annotations

from pathlib import Path

import accelerate
import torch
import transformers

from moecompress.checkpoint.fingerprint import all_finite
from moecompress.checkpoint.headers import first_names
from moecompress.checkpoint.lazy import LazyCheckpoint, build_skeleton
from moecompress.checkpoint.validation import (
    has_tokenizer_files,
    is_compressed_tensors,
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
    if local is not None and is_compressed_tensors(config):
        model = load_compressed_tensors(local, dtype=dtype, experts_implementation=experts_implementation)
        _refuse_non_finite_tensors(source, model)
        _place(model, device, device_map)
        find_moe_blocks(model)
        return model, _load_tokenizer(source, local)
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
    _refuse_non_finite_tensors(source, model)
    if device_map is None:  # from_pretrained placed a mapped model itself
        model.to(device)
    model.eval()
    find_moe_blocks(model)  # a config that claims MoE but built no MoE block (e.g. num_experts=0) fails here
    restore_expert_id_map(model)
    apply_odp_from_config(model, odp)
    return model, _load_tokenizer(source, local)


def _place(model: torch.nn.Module, device, device_map: dict | None) -> None:
    """A model built in memory on ``device``, or spread by ``device_map`` (accelerate)."""
    if device_map is None:
        model.to(device)
    else:
        accelerate.dispatch_model(model, device_map)


def load_compressed_tensors(folder: Path, *, dtype: torch.dtype, experts_implementation: str = "eager"):
    """A compressed-tensors folder (ours or llm-compressor's) as the plain model it decompresses to, in eval mode.

    Every compressed module is decompressed by compressed-tensors with its own config group's scheme, in float32
    (:mod:`moecompress.checkpoint.compressed_input`), then cast to ``dtype``: per-layer mixed exports load exactly,
    and every tensor the model needs must be in the folder (a missing one is an error, never a random init)."""
    model, _ = build_skeleton(folder, dtype=dtype)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights are decompressed: a plain model from here on
    checkpoint = LazyCheckpoint(folder, model)
    tied = set(model.all_tied_weights_keys or {})
    try:
        for name, child in model.named_children():
            keys = {f"{name}.{key}" for key in child.state_dict()}
            if keys and not keys <= tied:
                checkpoint.load_module(child, f"{name}.", dtype=dtype, device="cpu")
    finally:
        checkpoint.close()
    model.tie_weights()
    model.set_experts_implementation(experts_implementation)
    model.eval()
    return model


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


def _refuse_non_finite_tensors(source, model: torch.nn.Module) -> None:
    """A NaN or infinity in a weight, a packed model's scales or a norm makes every score NaN (or silently wrong) and
    would be copied into any export: refuse the checkpoint, naming the tensors."""
    bad = non_finite_tensors(model)
    if bad:
        raise CheckpointError(
            f"{source}: {len(bad)} tensor(s) hold NaN or infinite values ({first_names(bad)}); the checkpoint is "
            "damaged (or was saved from a diverged run). Re-download it, or re-run the compression that wrote it."
        )


def non_finite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the floating-point tensors of ``model``'s state dict (weights, scales, norms: what a checkpoint holds,
    not the masks a module builds for itself) holding a NaN or an infinity."""
    bad = []
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.device.type != "meta" and not all_finite(tensor):
            bad.append(name)
    return bad


def _load_tokenizer(source: str | Path, local: Path | None):
    if local is not None and not has_tokenizer_files(local):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"the tokenizer of {source} cannot be loaded: {error}") from error

"""The native checkpoint format: what plain transformers layouts cannot hold, reloadable with ``from_pretrained``.

A native checkpoint is an ordinary Hugging Face folder (``config.json``, safetensors shards, tokenizer) whose config
carries ``quantization_config = {"quant_method": "moecompress", ...}``. ``import moecompress`` registers that
method with transformers' quantizer registry, so plain ``AutoModelForCausalLM.from_pretrained(folder)`` rebuilds:

* packed experts (:class:`moecompress.kernels.backend.PackedExperts`): per MoE layer a bit-width per expert, one
  group size and symmetry per layer; their tensors are saved under the module's buffer names
  (``...experts.gate_up_proj_packed_w4``, ``...experts.expert_bits``, ...);
* MoE layers with different expert counts (``config.moecompress.num_experts_per_layer``, written by the edits):
  router and experts are resized on the meta skeleton before the weights load. Such a model, quantised or not,
  is saved with a native ``quantization_config`` (:func:`needs_native_format`), so it reloads the same way.

``quantization_config`` fields: ``format_version`` (1), ``layers`` ``{decoder layer: {"expert_bits": [E],
"group_size", "symmetric"}}`` for layers with packed experts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from moecompress.checkpoint.native_registration import QUANT_METHOD, LazyQuantizationConfig, LazyQuantizer
from moecompress.errors import CheckpointError
from moecompress.kernels.backend import PackedExperts, register_packed_experts_backend
from moecompress.kernels.linear import PackedLinear
from moecompress.kernels.odp import apply_odp_from_config
from moecompress.kernels.variable_width import (
    SegmentedPackedExperts,
    VariableWidthExperts,
    slice_linear_rows_and_columns,
)
from moecompress.models.edits import (
    CONFIG_RECORD_KEY,
    keep_experts,
    materialize_expert_id_map,
    replace_experts,
    restore_expert_id_map,
)
from moecompress.models.families import decoder_layers, find_moe_blocks, text_config

FORMAT_VERSION = 1


class MoECompressQuantizationConfig(QuantizationConfigMixin):
    """``quantization_config`` of a native checkpoint (see the module docstring for the fields)."""

    def __init__(self, layers: dict | None = None, linears: dict | None = None, format_version: int = FORMAT_VERSION,
                 **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = int(format_version)
        if self.format_version > FORMAT_VERSION:
            raise CheckpointError(f"this checkpoint uses moecompress format version {self.format_version}, newer than "
                                  f"this moecompress ({FORMAT_VERSION}); upgrade moecompress to load it")
        self.layers = {str(layer): dict(spec) for layer, spec in (layers or {}).items()}
        self.linears = {str(path): dict(spec) for path, spec in (linears or {}).items()}

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version, "layers": self.layers,
                "linears": self.linears}

    @classmethod
    def from_model(cls, model: nn.Module, layer_index: int | None = None) -> "MoECompressQuantizationConfig":
        """The config describing ``model``'s packed modules as they are now (only decoder layer ``layer_index``'s,
        when given: the others are not read)."""
        layers = {}
        prefix = ""
        if layer_index is not None:
            layer = decoder_layers(model)[layer_index]
            prefix = next(name for name, module in model.named_modules() if module is layer) + "."
        for view in find_moe_blocks(model):
            if layer_index is not None and view.layer_index != layer_index:
                continue
            if isinstance(view.experts, PackedExperts):
                layers[str(view.layer_index)] = {
                    "expert_bits": [int(bits) for bits in view.experts.expert_bits.tolist()],
                    "group_size": int(view.experts.group_size),
                    "symmetric": bool(view.experts.symmetric),
                }
        linears = {path: {"bits": module.bits, "group_size": module.group_size, "symmetric": module.symmetric,
                          "bias": module.bias is not None}
                   for path, module in model.named_modules()
                   if isinstance(module, PackedLinear) and path.startswith(prefix)}
        return cls(layers=layers, linears=linears)


class MoECompressQuantizer(HfQuantizer):
    """Rebuilds a native checkpoint's structure on the meta skeleton; the loader then fills it by name."""

    requires_calibration = True  # only pre-quantized checkpoints: quantising happens in moecompress's stages

    def _process_model_before_weight_loading(self, model, **kwargs):
        prepare_skeleton(model, self.quantization_config, dtype=kwargs.get("dtype"))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        register_packed_experts_backend()
        apply_odp_from_config(model)  # the config's MC-MoE ODP, unless MOECOMPRESS_ODP=0
        return model

    def update_dtype(self, dtype):
        return dtype

    def is_serializable(self, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def prepare_skeleton(model: nn.Module, quantization_config: MoECompressQuantizationConfig, dtype=None) -> None:
    """Give a freshly built (meta) model the native checkpoint's structure: per-layer expert counts, packed experts."""
    record = getattr(text_config(model.config), CONFIG_RECORD_KEY, None) or {}
    per_layer_counts = {int(layer): int(count) for layer, count in (record.get("num_experts_per_layer") or {}).items()}
    resize = {view.layer_index: list(range(per_layer_counts[view.layer_index])) for view in find_moe_blocks(model)
              if per_layer_counts.get(view.layer_index, view.num_experts) != view.num_experts}
    if resize:
        keep_experts(model, resize)
    if record.get("variable_width"):
        _variable_width_skeleton(model, record["variable_width"])
    if record.get("camera_q"):
        _segmented_skeleton(model, record["camera_q"], dtype)
    views = {view.layer_index: view for view in find_moe_blocks(model)}
    scale_dtype = dtype if isinstance(dtype, torch.dtype) else (model.dtype if model.dtype.is_floating_point else torch.bfloat16)
    for layer_key, spec in quantization_config.layers.items():
        view = views.get(int(layer_key))
        if view is None:
            raise CheckpointError(f"quantization_config names MoE layer {layer_key}, which the model does not have; "
                                  "the config.json was edited or belongs to another model")
        expert_bits = [int(bits) for bits in spec["expert_bits"]]
        if len(expert_bits) != view.num_experts:
            raise CheckpointError(f"layer {layer_key}: quantization_config lists {len(expert_bits)} expert widths for "
                                  f"{view.num_experts} experts; the checkpoint's config.json is inconsistent")
        packed = PackedExperts.skeleton(
            expert_bits, view.hidden_size, view.intermediate_size, group_size=int(spec["group_size"]),
            symmetric=bool(spec["symmetric"]), act_fn=view.experts.act_fn, config=getattr(view.experts, "config", None),
            scale_dtype=scale_dtype,
        )
        replace_experts(view, packed)
    for path, spec in quantization_config.linears.items():
        try:
            linear = model.get_submodule(path)
        except AttributeError:
            raise CheckpointError(f"quantization_config names the linear {path}, which the model does not have; the "
                                  "config.json was edited or belongs to another model") from None
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, PackedLinear.skeleton(
            linear.in_features, linear.out_features, bits=int(spec["bits"]), group_size=int(spec["group_size"]),
            symmetric=bool(spec["symmetric"]), bias=bool(spec["bias"]), scale_dtype=scale_dtype))


def _variable_width_skeleton(model: nn.Module, widths: dict) -> None:
    """Give each layer named in ``config.moecompress["variable_width"]`` (``{layer: {"expert_widths": [E],
    "shared_widths": [S]}}``, written by CAMERA-P's physical mode) variable-width experts and sliced shared experts."""
    views = {view.layer_index: view for view in find_moe_blocks(model)}
    for layer_key, spec in widths.items():
        view = views.get(int(layer_key))
        if view is None or len(spec["expert_widths"]) != view.num_experts:
            raise CheckpointError(f"config.moecompress.variable_width names layer {layer_key} with "
                                  f"{len(spec['expert_widths'])} experts, which the model does not have; the "
                                  "config.json was edited or belongs to another model")
        experts = VariableWidthExperts(spec["expert_widths"], view.hidden_size, view.experts.act_fn,
                                       config=getattr(view.experts, "config", None),
                                       dtype=view.experts.gate_up_proj.dtype, device=view.experts.gate_up_proj.device)
        replace_experts(view, experts)
        for shared, width in zip(view.shared_experts, spec.get("shared_widths", [])):
            if int(width) != int(shared.module.down_proj.in_features):
                slice_linear_rows_and_columns(shared.module, torch.arange(int(width)))


def _segmented_skeleton(model: nn.Module, layers: dict, dtype) -> None:
    """Give each layer named in ``config.moecompress["camera_q"]`` (``{layer: {"segment_widths": [E][3], "bits",
    "group_size"}}``, written by CAMERA-Q) its segment-packed experts."""
    views = {view.layer_index: view for view in find_moe_blocks(model)}
    scale_dtype = dtype if isinstance(dtype, torch.dtype) else (model.dtype if model.dtype.is_floating_point else torch.bfloat16)
    for layer_key, spec in layers.items():
        view = views.get(int(layer_key))
        if view is None or len(spec["segment_widths"]) != view.num_experts:
            raise CheckpointError(f"config.moecompress.camera_q names layer {layer_key}, which does not match the model; "
                                  "the config.json was edited or belongs to another model")
        replace_experts(view, SegmentedPackedExperts(spec["segment_widths"], spec["bits"], view.hidden_size,
                                                     int(spec["group_size"]), view.experts.act_fn,
                                                     config=getattr(view.experts, "config", None),
                                                     scale_dtype=scale_dtype, device=view.router_weight.device))


def needs_native_format(model: nn.Module) -> bool:
    """Does ``model`` hold what a plain transformers config cannot describe (packed modules, MoE layers with
    different expert counts)? Such a model must be saved with a native ``quantization_config``."""
    record = getattr(text_config(model.config), CONFIG_RECORD_KEY, None) or {}
    if record.get("num_experts_per_layer") or record.get("variable_width") or record.get("camera_q"):
        return True
    return any(callable(getattr(module, "parameter_counts", None)) for module in model.modules())


def native_quantization_config(config) -> MoECompressQuantizationConfig | None:
    """The native format's quantization config of a transformers ``config`` (a dict after ``from_pretrained``
    of the config alone), or None when the checkpoint is not a moecompress native one."""
    quantization = getattr(config, "quantization_config", None)
    if isinstance(quantization, MoECompressQuantizationConfig):
        return quantization
    if isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD:
        return MoECompressQuantizationConfig(**{key: value for key, value in quantization.items()
                                                if key != "quant_method"})
    return None


def build_meta_model(config, dtype: torch.dtype | None = None) -> nn.Module:
    """The causal LM a checkpoint's ``config`` describes, on the meta device (shapes only), with a native
    checkpoint's structure (packed modules, per-layer expert counts) in place: what its weights must fit."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype else {}))
        native = native_quantization_config(config)
        if native is not None:
            prepare_skeleton(model, native, dtype=dtype)
    return model


def register_native_format() -> None:
    """Make ``quant_method: moecompress`` known to transformers (idempotent). ``import moecompress`` registers
    stand-ins (:mod:`moecompress.checkpoint.native_registration`); these classes replace them."""
    for mapping, real in ((AUTO_QUANTIZATION_CONFIG_MAPPING, MoECompressQuantizationConfig),
                          (AUTO_QUANTIZER_MAPPING, MoECompressQuantizer)):
        if mapping.get(QUANT_METHOD) in (None, LazyQuantizationConfig, LazyQuantizer):
            mapping[QUANT_METHOD] = real


def save_model(model: nn.Module, tokenizer, folder: Path) -> None:
    """``save_pretrained`` into a temp folder beside ``folder``, then move each file in with ``os.replace``.

    A model a plain transformers config cannot describe (packed experts, MoE layers with different expert counts)
    gets the native format's ``quantization_config`` first, so plain ``from_pretrained`` (after ``import
    moecompress``) rebuilds it."""
    temp = Path(tempfile.mkdtemp(prefix=".model-", dir=folder))
    # A remap merge (router rule R1) saves as a plain HF checkpoint with each merged expert repeated per router
    # output; the in-memory model is compacted again right after (load_model compacts on load too).
    remapped = any(view.expert_id_map is not None for view in find_moe_blocks(model))
    try:
        if remapped:
            materialize_expert_id_map(model)
        if needs_native_format(model):
            model.config.quantization_config = MoECompressQuantizationConfig.from_model(model)
        model.save_pretrained(temp)
        if tokenizer is not None:
            tokenizer.save_pretrained(temp)
        for file in temp.iterdir():
            os.replace(file, folder / file.name)
    finally:
        if remapped:
            restore_expert_id_map(model)
        shutil.rmtree(temp, ignore_errors=True)

"""Export a native moecompress folder as a compressed-tensors ``pack-quantized`` checkpoint (vLLM, transformers).

Streamed: one MoE layer's packed experts (or one plain tensor) is read, converted and handed to a shard writer at a
time. Per expert ``j`` of a layer the packed ``gate_up_proj`` / ``down_proj`` rows become the checkpoint's own
per-expert modules (``...experts.{j}.gate_proj`` / ``up_proj`` / ``down_proj``, or ``w1`` / ``w3`` / ``w2`` for
Mixtral, from transformers' conversion mapping), each with

    ``weight_packed`` int32 ``[out, ceil(in * b / 32)]``  (compressed-tensors' ``pack_to_int32`` of the signed codes)
    ``weight_scale``  ``[out, n_groups]``                 (our scales, unchanged)
    ``weight_shape``  int64 ``[2]``                        (``[out, in]``)
    ``weight_zero_point`` int32 ``[ceil(out * b / 32), n_groups]`` (asymmetric only; ``pack_to_int32(..., packed_dim=0)``)

Packed linears (attention, shared experts) keep their module names and get the same four tensors. Our codes and
compressed-tensors' use the same convention (signed ``q``, ``w = (q - zero_point) * scale``, see
:mod:`moecompress.quantization.packing`), so decompressing with the library gives our dequantised weights exactly
(:func:`decompression_difference` checks it expert by expert).

``quantization_config`` is built with the library's classes (``QuantizationConfig``, ``QuantizationScheme``,
``QuantizationArgs``): one config group per distinct scheme (bits, group size, symmetry), targets as ``re:`` regexes
naming whole layers' experts (expert groups first, so transformers' ``get_experts_scheme`` finds them), and
``ignore`` covering routers, norms, embeddings and ``lm_head``.

``--widen-to-layer-max`` (:func:`widen`): an expert of width ``b`` in a layer whose widest is ``B`` is stored at
``B`` bits with codes ``q * 2^(B-b)`` and scale ``s / 2^(B-b)`` (zero point ``z * 2^(B-b)``). The wider grid
contains every point of the narrower one, so this is lossless (the dequantised weights are bit-identical; dividing a
scale by a power of two is exact in floating point, checked) but it gains no accuracy: the expert keeps its ``b``-bit
values and pays ``B`` bits of storage for them.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    QuantizationStrategy,
)
from safetensors import safe_open

from moecompress.checkpoint.native_reader import (
    ExpertLayer,
    NativeCheckpoint,
    expert_projection_names,
    is_packed_experts_key,
)
from moecompress.checkpoint.shards import ShardWriter
from moecompress.errors import UsageError
from moecompress.export.deployability import check_deployable
from moecompress.export.output import check_output_folder, staged_output
from moecompress.export.report import ExportTally, write_report
from moecompress.kernels.layout import PackedLinearWeight

FORMAT = "compressed-tensors"
# Modules that are never quantised (compressed-tensors `ignore`): routers, norms, embeddings, the output head.
IGNORE = ["lm_head", r"re:.*\.gate$", r"re:.*norm$", r"re:.*embed_tokens$"]

Scheme = tuple[int, int, bool]  # (bits, group_size, symmetric)


def quantization_args(bits: int, group_size: int, symmetric: bool) -> QuantizationArgs:
    """compressed-tensors' description of one of our schemes (``group_size <= 0``: one scale per output row)."""
    if group_size > 0:
        return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=QuantizationStrategy.GROUP,
                                group_size=group_size)
    return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=QuantizationStrategy.CHANNEL)


def compressed_state(weight: PackedLinearWeight) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors of one matrix ``[out, in]`` (names without the module prefix), packed by the
    library's own ``pack_to_int32`` from our signed codes."""
    codes = weight.codes()  # int8 [out, in], signed
    state = {
        "weight_packed": pack_to_int32(codes, weight.bits),
        "weight_scale": weight.scales.contiguous(),
        "weight_shape": torch.tensor(list(weight.shape), dtype=torch.int64),
    }
    if weight.zeros is not None:
        state["weight_zero_point"] = pack_to_int32(weight.zeros.to(torch.int8).contiguous(), weight.bits, packed_dim=0)
    return state


def widen(weight: PackedLinearWeight, bits: int) -> PackedLinearWeight:
    """The same dequantised matrix stored at ``bits`` (>= its width): codes and zero points times ``2^(bits-b)``,
    scales divided by it (exact; see the module docstring). 1-bit codes (+-1) scale by ``2^(bits-2)``."""
    if weight.bits == bits:
        return weight
    factor = 2 ** (bits - max(weight.bits, 2)) if weight.bits == 1 else 2 ** (bits - weight.bits)
    codes = weight.codes().to(torch.int64) * factor
    scales = weight.scales / factor
    if not torch.equal(scales.float() * factor, weight.scales.float()):
        raise UsageError(f"widening {weight.bits} to {bits} bits would underflow a scale in {weight.scales.dtype}; "
                         "export without --widen-to-layer-max (quantize with `granularity: layer`)")
    zeros = None if weight.zeros is None else weight.zeros.to(torch.int64) * factor
    return PackedLinearWeight.from_codes(codes, scales, zeros, bits, weight.group_size)


def _expert_modules(checkpoint: NativeCheckpoint, layer: ExpertLayer, names: tuple[str, str, str], bits: int):
    """Yield ``(module name, PackedLinearWeight)`` for every expert projection of ``layer`` at ``bits``."""
    gate_name, up_name, down_name = names
    for expert in range(len(layer.expert_bits)):
        gate_up = checkpoint.expert_weight(layer, expert, "gate_up_proj")
        down = checkpoint.expert_weight(layer, expert, "down_proj")
        intermediate = gate_up.shape[0] // 2
        for name, weight in ((gate_name, gate_up.rows(0, intermediate)), (up_name, gate_up.rows(intermediate, 2 * intermediate)),
                             (down_name, down)):
            yield f"{layer.prefix}.{expert}.{name}", widen(weight, bits)


def _layer_regex(prefixes: list[str], names: tuple[str, str, str]) -> str:
    """One ``re:`` target for the expert projections of several layers: ``.*layers\\.(?:1|4)\\.mlp\\.experts\\.\\d+\\.(?:...)$``."""
    by_pattern = defaultdict(list)
    for prefix in prefixes:
        match = re.search(r"layers\.(\d+)\.(.+)$", prefix)
        by_pattern[re.escape(match.group(2))].append(match.group(1))
    parts = [rf".*layers\.(?:{'|'.join(layers)})\.{tail}\.\d+\.(?:{'|'.join(names)})$" for tail, layers in by_pattern.items()]
    return "re:" + (parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")")


def build_quantization_config(expert_targets: dict[Scheme, list[str]], linear_targets: dict[Scheme, list[str]],
                              names: tuple[str, str, str]) -> QuantizationConfig:
    """``QuantizationConfig`` with one group per scheme; expert groups first (transformers reads the first group
    whose ``re:`` targets mention experts as the experts' scheme)."""
    schemes = list(dict.fromkeys([*expert_targets, *linear_targets]))
    groups = {}
    for number, scheme in enumerate(schemes):
        targets = []
        if expert_targets.get(scheme):
            targets.append(_layer_regex(expert_targets[scheme], names))
        targets += [rf"re:.*{re.escape(_from_layers(path))}$" for path in linear_targets.get(scheme, [])]
        groups[f"group_{number}"] = QuantizationScheme(targets=targets, weights=quantization_args(*scheme))
    return QuantizationConfig(config_groups=groups, format="pack-quantized", ignore=list(IGNORE),
                              quantization_status=QuantizationStatus.COMPRESSED)


def _from_layers(path: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``layers.3.self_attn.q_proj`` (consumers may name the root otherwise)."""
    index = path.find("layers.")
    return path[index:] if index >= 0 else path


def export_compressed_tensors(source: str | Path, out: str | Path, *, tp: int = 1, widen_to_layer_max: bool = False,
                              max_shard_bytes: int = 2 << 30, replace_own: bool = False) -> dict:
    """Write ``out`` (new or empty) as a compressed-tensors checkpoint of the native folder ``source``.

    Refuses (:class:`moecompress.export.deployability.NotDeployableError`) what vLLM cannot serve at tensor-parallel
    size ``tp``; ``widen_to_layer_max`` stores every expert of a layer at the layer's widest width. Returns the
    export report (also written to ``out/export_report.json``).
    """
    checkpoint = NativeCheckpoint(source)
    out = Path(out)
    check_output_folder(checkpoint.folder, out, replace_own=replace_own)
    if not checkpoint.is_quantized:
        raise UsageError(f"{checkpoint.folder} holds no quantized weights; export it with --format hf (a plain "
                         "checkpoint), or add an `rtn` / `gptq` stage to the recipe")
    check_deployable(checkpoint, tp=tp, widen_to_layer_max=widen_to_layer_max)
    names = expert_projection_names(checkpoint.model_type)
    layers = {layer.prefix: layer for layer in checkpoint.expert_layers}
    linears = {spec.path: spec for spec in checkpoint.packed_linears}
    expert_targets: dict[Scheme, list[str]] = defaultdict(list)
    linear_targets: dict[Scheme, list[str]] = defaultdict(list)
    tally = ExportTally()
    with staged_output(out, replace_own=replace_own) as partial:
        writer = ShardWriter(partial, max_shard_bytes)
        done_layers = set()
        for key in checkpoint.keys():
            if is_packed_experts_key(key):
                prefix = key.rsplit(".", 1)[0]
                if prefix in done_layers:
                    continue
                done_layers.add(prefix)
                layer = layers[prefix]
                bits = max(layer.expert_bits)
                expert_targets[(bits, layer.group_size, layer.symmetric)].append(prefix)
                for module, weight in _expert_modules(checkpoint, layer, names, bits):
                    _write_module(writer, tally, module, weight, expert=True)
                tally.widened_experts += sum(1 for b in layer.expert_bits if b != bits)
            elif key.rsplit(".", 1)[0] in linears and key.rsplit(".", 1)[1] in ("weight_packed", "weight_scale",
                                                                               "weight_zero_point"):
                path = key.rsplit(".", 1)[0]
                if key.endswith(".weight_packed"):
                    spec = linears[path]
                    linear_targets[(spec.bits, spec.group_size, spec.symmetric)].append(path)
                    _write_module(writer, tally, path, checkpoint.linear_weight(spec), expert=False)
            else:
                tensor = checkpoint.tensor(key)
                writer.add(key, tensor)
                tally.add_plain(tensor)
        writer.finish()
        config = dict(checkpoint.config)
        quantization = build_quantization_config(expert_targets, linear_targets, names)
        config["quantization_config"] = quantization.model_dump(mode="json")
        (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        checkpoint.copy_side_files(partial)
        report = write_report(partial, FORMAT, checkpoint, out, tally, tp=tp, notes=_consumer_notes(expert_targets))
    checkpoint.close()
    return report


def _write_module(writer: ShardWriter, tally, module: str, weight: PackedLinearWeight, *, expert: bool) -> None:
    state = compressed_state(weight)
    for name, tensor in state.items():
        writer.add(f"{module}.{name}", tensor)
    tally.add_packed(weight.shape, state, expert=expert)


def _consumer_notes(expert_targets: dict[Scheme, list[str]]) -> list[str]:
    """What plain transformers (5.24) cannot load from this folder, and why (vLLM reads it)."""
    notes = []
    if len(expert_targets) > 1:
        notes.append(
            "MoE layers use different schemes: vLLM serves this (one scheme per MoE layer), but transformers 5.24 "
            "decompresses every layer's experts with ONE scheme (integrations/compressed_tensors.py "
            "get_experts_scheme: the first config group whose re: targets mention experts), so plain from_pretrained "
            "fails (\"The size of tensor a (6) must match the size of tensor b (8)\" / \"tensor column shape must be "
            "divisble by the given group_size\"); load it in vLLM, or use our native folder")
    if any(not symmetric for _, _, symmetric in expert_targets):
        notes.append(
            "asymmetric experts: transformers 5.24's MoE decompression (CompressedTensorsDequantize) builds its module "
            "from weight_packed/weight_scale/weight_shape only, so plain from_pretrained fails (\"Asymmetric quant "
            "requires zero-point values\"); load it in vLLM (4/8 bit), or use our native folder")
    return notes


def decompression_difference(native_folder: str | Path, exported_folder: str | Path) -> dict[str, float]:
    """Decompress every quantized module of an export with compressed-tensors' own compressor and compare it with
    our dequantised weight from the native folder. Returns ``{"modules": n, "max_abs_diff": d}`` (d is 0.0 when
    the library reproduces our weights exactly)."""
    native = NativeCheckpoint(native_folder)
    exported = Path(exported_folder)
    config = QuantizationConfig.model_validate(json.loads((exported / "config.json").read_text())["quantization_config"])
    files = sorted(exported.glob("*.safetensors"))
    handles = [safe_open(str(path), framework="pt") for path in files]
    file_of = {key: handle for handle in handles for key in handle.keys()}
    names = expert_projection_names(native.model_type)
    modules, worst = 0, 0.0

    def library_weight(module: str) -> torch.Tensor:
        scheme = _scheme_for(config, module)
        state = {name: file_of[f"{module}.{name}"].get_tensor(f"{module}.{name}")
                 for name in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
                 if f"{module}.{name}" in file_of}
        return PackedQuantizationCompressor.decompress(state, scheme)["weight"]

    for layer in native.expert_layers:
        for expert in range(len(layer.expert_bits)):
            gate_up = native.expert_weight(layer, expert, "gate_up_proj").dequantize()
            down = native.expert_weight(layer, expert, "down_proj").dequantize()
            middle = gate_up.shape[0] // 2
            for name, ours in zip(names, (gate_up[:middle], gate_up[middle:], down)):
                theirs = library_weight(f"{layer.prefix}.{expert}.{name}")
                worst = max(worst, float((theirs.float() - ours.float()).abs().max()))
                modules += 1
    for spec in native.packed_linears:
        theirs = library_weight(spec.path)
        worst = max(worst, float((theirs.float() - native.linear_weight(spec).dequantize().float()).abs().max()))
        modules += 1
    return {"modules": modules, "max_abs_diff": worst}


def _scheme_for(config: QuantizationConfig, module: str) -> QuantizationScheme:
    """The config group whose targets match ``module`` (how a consumer resolves it)."""
    for scheme in config.config_groups.values():
        for target in scheme.targets:
            if target.startswith("re:") and re.match(target[3:], module):
                return scheme
    raise KeyError(f"no config group targets {module}")

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
``QuantizationArgs``) and written the way llm-compressor's ``ModelCompressor`` writes it (``version``,
``sparsity_config``, ``transform_config``): one config group per distinct scheme (bits, group size, symmetry),
targets as ``re:`` regexes naming whole layers' experts, and ``ignore`` listing every unquantized linear by name
(attention projections, routers, ``lm_head``).

**Exact or refused in each consumer.** vLLM resolves each MoE layer's scheme by matching its names against the
targets. Plain transformers (5.25) decodes the experts of *every* layer with one scheme, the first group whose
``re:`` targets mention experts, and without zero points (:mod:`moecompress.export.deployability`). So:

* one symmetric experts scheme for the whole model (uniform exports, ``--widen-to-model-max``): exact in both;
* per-layer schemes or asymmetric experts: refused unless ``--for vllm``. Then the expert groups are ordered so that
  transformers' scheme is one it cannot decode the other layers with (asymmetric first, else the widest), and
  :func:`transformers_experts_outcome` decodes one expert of every layer the way transformers does before anything
  is written: the export goes ahead only if that raises (transformers refuses the folder) or is exact. The printed
  "load with" lines and the folder's ``README.md`` name only the consumers that load it.

``--widen-to-layer-max`` / ``--widen-to-model-max`` (:func:`widen`): an expert of width ``b`` stored at ``B`` bits
(the layer's or the model's widest) has codes ``q * 2^(B-b)`` and scale ``s / 2^(B-b)`` (zero point ``z * 2^(B-b)``).
The wider grid contains every point of the narrower one, so this is lossless (the dequantised weights are
bit-identical; dividing a scale by a power of two is exact in floating point, checked) but it gains no accuracy: the
expert keeps its ``b``-bit values and pays ``B`` bits of storage for them.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import compressed_tensors
import torch
from compressed_tensors.compressors import BaseCompressor
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
from moecompress.export.deployability import CONSUMERS, NotDeployableError, check_deployable
from moecompress.export.output import check_output_folder, staged_output
from moecompress.export.report import ExportTally, write_report
from moecompress.kernels.layout import PackedLinearWeight

FORMAT = "compressed-tensors"
FORMAT_NAME = "pack-quantized"
# Embedding-like 2-D weights: not linears, so not listed in `ignore` (llm-compressor lists linears only).
_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embeddings", "embed_in")

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
                         "export without widening (quantize with `granularity: layer` and one width for all layers)")
    zeros = None if weight.zeros is None else weight.zeros.to(torch.int64) * factor
    return PackedLinearWeight.from_codes(codes, scales, zeros, bits, weight.group_size)


def _expert_modules(checkpoint: NativeCheckpoint, layer: ExpertLayer, names: tuple[str, str, str], bits: int,
                    experts: range | None = None):
    """Yield ``(module name, PackedLinearWeight)`` for every expert projection of ``layer`` (or of ``experts``)
    at ``bits``."""
    gate_name, up_name, down_name = names
    for expert in experts if experts is not None else range(len(layer.expert_bits)):
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


def transformers_order(schemes) -> list[Scheme]:
    """Expert schemes in config-group order: the first is the one plain transformers decodes every layer with, so it
    is one the other layers' data cannot be decoded with without an error: an asymmetric scheme first (transformers
    drops zero points and raises), else the widest (narrower data does not fill its groups)."""
    return sorted(schemes, key=lambda scheme: (scheme[2], -scheme[0], scheme[1]))


def build_quantization_config(expert_targets: dict[Scheme, list[str]], linear_targets: dict[Scheme, list[str]],
                              names: tuple[str, str, str], ignore: list[str]) -> QuantizationConfig:
    """``QuantizationConfig`` with one group per scheme: expert groups first, in :func:`transformers_order` (the
    group names sort in that order too, as config.json is written with sorted keys), then the other linears'."""
    schemes = list(dict.fromkeys([*transformers_order(expert_targets), *linear_targets]))
    digits = len(str(len(schemes) - 1))
    groups = {}
    for number, scheme in enumerate(schemes):
        targets = []
        if expert_targets.get(scheme):
            targets.append(_layer_regex(expert_targets[scheme], names))
        targets += [rf"re:.*{re.escape(_from_layers(path))}$" for path in linear_targets.get(scheme, [])]
        groups[f"group_{number:0{digits}d}"] = QuantizationScheme(targets=targets, weights=quantization_args(*scheme),
                                                                  format=FORMAT_NAME)
    return QuantizationConfig(config_groups=groups, format=FORMAT_NAME, ignore=list(ignore),
                              quantization_status=QuantizationStatus.COMPRESSED)


def config_entry(quantization: QuantizationConfig) -> dict:
    """``config.json``'s ``quantization_config`` as llm-compressor's ``ModelCompressor.update_config`` writes it:
    the library's version, empty sparsity and transform configs, then the quantization config."""
    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors", "sparsity_config": {},
            "transform_config": {}, **quantization.model_dump(mode="json", exclude={"quant_method"})}


def _from_layers(path: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``layers.3.self_attn.q_proj`` (consumers may name the root otherwise)."""
    index = path.find("layers.")
    return path[index:] if index >= 0 else path


def unquantized_linears(checkpoint: NativeCheckpoint, quantized: set[str]) -> list[str]:
    """Every module of the checkpoint with a plain 2-D ``weight`` that is neither quantized nor an embedding (the
    attention projections, routers, dense MLPs, ``lm_head``), by name, in checkpoint order; ``lm_head`` always
    (a tied head has no tensor of its own), as llm-compressor lists them."""
    names = []
    for key in checkpoint.keys():
        module, _, name = key.rpartition(".")
        if name != "weight" or module in quantized or is_packed_experts_key(key):
            continue
        if module.rsplit(".", 1)[-1] in _EMBEDDING_NAMES or len(checkpoint.shape(key)) != 2:
            continue
        names.append(module)
    if not any(name == "lm_head" or name.endswith(".lm_head") for name in names):
        names.append("lm_head")
    return names


def export_compressed_tensors(source: str | Path, out: str | Path, *, tp: int = 1, widen_to_layer_max: bool = False,
                              widen_to_model_max: bool = False, consumer: str | None = None,
                              max_shard_bytes: int = 2 << 30, replace_own: bool = False) -> dict:
    """Write ``out`` (new or empty) as a compressed-tensors checkpoint of the native folder ``source``.

    ``consumer``: None (the folder must load exactly in plain transformers and in vLLM) or ``"vllm"`` (vLLM only:
    per-layer schemes and asymmetric experts are written, and plain transformers must refuse the folder). Refuses
    (:class:`moecompress.export.deployability.NotDeployableError`) what a consumer could not load exactly at
    tensor-parallel size ``tp``; ``widen_to_layer_max`` stores every expert of a layer at the layer's widest width,
    ``widen_to_model_max`` at the model's. Returns the export report (also written to ``out/export_report.json``).
    """
    if consumer not in (None, "vllm"):
        raise UsageError(f"unknown consumer {consumer!r} for --for; use vllm (or leave it out: every consumer)")
    consumers = CONSUMERS if consumer is None else (consumer,)
    checkpoint = NativeCheckpoint(source)
    out = Path(out)
    check_output_folder(checkpoint.folder, out, replace_own=replace_own)
    if not checkpoint.is_quantized:
        raise UsageError(f"{checkpoint.folder} holds no quantized weights; export it with --format hf (a plain "
                         "checkpoint), or add an `rtn` / `gptq` stage to the recipe")
    check_deployable(checkpoint, tp=tp, widen_to_layer_max=widen_to_layer_max, widen_to_model_max=widen_to_model_max,
                     consumers=consumers)
    names = expert_projection_names(checkpoint.model_type)
    layers = {layer.prefix: layer for layer in checkpoint.expert_layers}
    stored_bits = _stored_bits(checkpoint.expert_layers, widen_to_model_max)
    linears = {spec.path: spec for spec in checkpoint.packed_linears}
    expert_targets: dict[Scheme, list[str]] = defaultdict(list)
    for layer in checkpoint.expert_layers:
        expert_targets[(stored_bits[layer.prefix], layer.group_size, layer.symmetric)].append(layer.prefix)
    linear_targets: dict[Scheme, list[str]] = defaultdict(list)
    for spec in checkpoint.packed_linears:
        linear_targets[(spec.bits, spec.group_size, spec.symmetric)].append(spec.path)
    quantization = build_quantization_config(expert_targets, linear_targets, names,
                                             unquantized_linears(checkpoint, set(linears)))
    outcome = transformers_experts_outcome(checkpoint, quantization, names, stored_bits)
    if outcome == "silent" or (outcome == "raises" and "transformers" in consumers):
        raise NotDeployableError(
            f"cannot export {checkpoint.folder} as compressed-tensors: plain transformers would decode its MoE layers "
            "with one scheme " + ("without an error but to wrong weights (the experts are too narrow for a decode "
                                  "error)" if outcome == "silent" else "and refuse it")
            + "; export with --widen-to-model-max (one scheme: exact everywhere)")
    loads = tuple(name for name in consumers if name != "transformers" or outcome == "exact")
    if outcome == "exact" and "transformers" not in loads:
        loads = CONSUMERS  # --for vllm on a folder transformers loads exactly too
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
                for module, weight in _expert_modules(checkpoint, layer, names, stored_bits[prefix]):
                    _write_module(writer, tally, module, weight, expert=True)
                tally.widened_experts += sum(1 for b in layer.expert_bits if b != stored_bits[prefix])
            elif key.rsplit(".", 1)[0] in linears and key.rsplit(".", 1)[1] in ("weight_packed", "weight_scale",
                                                                               "weight_zero_point"):
                path = key.rsplit(".", 1)[0]
                if key.endswith(".weight_packed"):
                    _write_module(writer, tally, path, checkpoint.linear_weight(linears[path]), expert=False)
            else:
                tensor = checkpoint.tensor(key)
                writer.add(key, tensor)
                tally.add_plain(tensor)
        writer.finish()
        config = dict(checkpoint.config)
        config["quantization_config"] = config_entry(quantization)
        (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        checkpoint.copy_side_files(partial)
        notes = _consumer_notes(expert_targets, loads)
        report = write_report(partial, FORMAT, checkpoint, out, tally, tp=tp, notes=notes, consumers=loads)
    checkpoint.close()
    return report


def _stored_bits(expert_layers: list[ExpertLayer], widen_to_model_max: bool) -> dict[str, int]:
    """Per experts prefix, the width its experts are written at: the layer's widest (a mixed layer is refused
    before this unless widened), or the model's widest with ``widen_to_model_max``."""
    model_max = max((max(layer.expert_bits) for layer in expert_layers), default=0)
    return {layer.prefix: model_max if widen_to_model_max else max(layer.expert_bits) for layer in expert_layers}


def transformers_experts_outcome(checkpoint: NativeCheckpoint, quantization: QuantizationConfig,
                                 names: tuple[str, str, str], stored_bits: dict[str, int]) -> str:
    """How plain transformers' compressed-tensors loader would decode the experts of this export: ``"exact"``,
    ``"raises"`` or ``"silent"`` (loads wrong weights without an error).

    Reproduces transformers 5.25's ``CompressedTensorsDequantize``: every layer's experts are decoded with one
    scheme (the first group whose ``re:`` targets mention experts) from ``weight_packed``, ``weight_scale`` and
    ``weight_shape`` only (no zero point), by compressed-tensors' pack-quantized decompressor. Expert 0's three
    projections of every MoE layer are decoded; one error anywhere makes ``from_pretrained`` raise."""
    if not checkpoint.expert_layers:
        return "exact"
    scheme = next(group for group in quantization.config_groups.values()
                  if any(target.startswith("re:") and "experts" in target for target in group.targets))
    compressor = BaseCompressor.get_value_from_registry(scheme.format or quantization.format)
    wrong = False
    for layer in checkpoint.expert_layers:
        for _, weight in _expert_modules(checkpoint, layer, names, stored_bits[layer.prefix], range(1)):
            state = compressed_state(weight)
            state.pop("weight_zero_point", None)
            try:
                decoded = compressor.decompress(state, scheme)["weight"]
            except Exception:  # any error in transformers' conversion op makes from_pretrained raise
                return "raises"
            expected = weight.dequantize(torch.float32).to(decoded.dtype)
            wrong = wrong or decoded.shape != expected.shape or not torch.equal(decoded, expected)
    return "silent" if wrong else "exact"


def _write_module(writer: ShardWriter, tally, module: str, weight: PackedLinearWeight, *, expert: bool) -> None:
    state = compressed_state(weight)
    for name, tensor in state.items():
        writer.add(f"{module}.{name}", tensor)
    tally.add_packed(weight.shape, state, expert=expert)


def _consumer_notes(expert_targets: dict[Scheme, list[str]], loads: tuple[str, ...]) -> list[str]:
    """Why a consumer is missing from the folder's "load with" lines."""
    if "transformers" in loads:
        return []
    if any(not symmetric for _, _, symmetric in expert_targets):
        return ["asymmetric experts: plain transformers (5.25) decodes MoE experts without their zero points and "
                "refuses this folder (\"Asymmetric quant requires zero-point values\"); serve it with vLLM (4/8 bit), "
                "or load the native folder"]
    widths = sorted({bits for bits, _, _ in expert_targets})
    return [f"MoE layers use different schemes ({', '.join(f'{bits}-bit' for bits in widths)}): vLLM reads one scheme "
            "per layer; plain transformers (5.25) decodes every layer's experts with the first experts group's scheme, "
            f"written as the widest ({max(widths)}-bit), so from_pretrained raises on the narrower layers (checked at "
            "export) instead of loading wrong weights; serve it with vLLM, or load the native folder (or re-export "
            "with --widen-to-model-max for a folder transformers loads)"]


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

"""Export a model folder as one GGUF file for llama.cpp, each tensor in the type our allocation chose.

    export_gguf("runs/pmq", "runs/pmq.gguf")                                  # types from the native widths
    export_gguf("runs/pmq", "runs/pmq.gguf", types="attention=Q6_K,embedding=Q8_0")
    export_gguf("models/original", "original.gguf")                           # unquantized: the float dtype

The source is a native moecompress folder (packed experts and linears) or an unquantized Hugging Face / moecompress
folder. llama.cpp stores the routed experts of a layer as one 3-D tensor per projection (``ffn_{gate,up,down}_exps``,
``[n_expert, out, in]``), so a type is chosen per layer and projection, not per expert: a layer whose experts have
different widths is stored at its widest (lossless for the narrower codes where the container holds them, see
:mod:`moecompress.export.gguf_types`) or, with ``layer_mean``, at its mean width. Each tensor's type comes from the
``--types`` table by role (:class:`~moecompress.export.gguf_types.TypeTable`); ``auto`` (the default) takes the
width the source holds (8 -> Q8_0 and symmetric 4 -> Q4_0 bit for bit, asymmetric 4 -> Q4_1, 3 -> Q3_K, 2 and
1 -> Q2_K); float weights stay in their dtype in an unquantized model and become Q8_0 in a quantized one (what the
compression left in float: attention, shared experts, embeddings). Routers default to F32, norms and the routing
bias are always F32.

Everything that can be refused is checked before the file is opened: an architecture llama.cpp does not run (or a
config it would compute differently), experts it cannot store (different counts per layer, different widths per
expert), a missing or unrecognised tokenizer, an unknown type. The file is written under a temporary name beside
``out`` and renamed into place when complete (one ``os.replace``); a report (types, sizes, the error each
re-quantized tensor added against the source's weights) is written beside it as ``<stem>.export_report.json``.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch

from moecompress.checkpoint.headers import checkpoint_bytes
from moecompress.errors import UnsupportedModelError, UsageError
from moecompress.export.gguf_arch import (Architecture, architecture_of, check_config, kv_b_rows,
                                          rope_pair_permutation, write_hyperparameters)
from moecompress.export.gguf_source import ExpertStack, Matrix, SourceModel
from moecompress.export.gguf_tokenizer import tokenizer_metadata
from moecompress.export.gguf_types import (GGMLType, SourceFormat, TypeChoice, TypeTable, choose_type,
                                           decode, encode_exact, encode_values, float_type_of, layer_width,
                                           scale_rounding, tensor_bytes)
from moecompress.folders import write_json_atomic
from moecompress.version import __version__

FORMAT = "gguf"
SOURCE_KEY = "moecompress.source"  # the folder a file was exported from: a re-export of it may replace the file
T = gguf.MODEL_TENSOR
# GGUF tensor kind -> (role in the --types table, projection)
ROLE_OF = {
    T.TOKEN_EMBD: ("embedding", None), T.OUTPUT: ("output", None), T.FFN_GATE_INP: ("router", None),
    T.ATTN_Q: ("attention", "q"), T.ATTN_K: ("attention", "k"), T.ATTN_V: ("attention", "v"),
    T.ATTN_OUT: ("attention", "output"), T.ATTN_Q_A: ("attention", "q_a"), T.ATTN_Q_B: ("attention", "q_b"),
    T.ATTN_KV_A_MQA: ("attention", "kv_a"), T.ATTN_K_B: ("attention", "k_b"), T.ATTN_V_B: ("attention", "v_b"),
    T.FFN_GATE: ("dense_ffn", "gate"), T.FFN_UP: ("dense_ffn", "up"), T.FFN_DOWN: ("dense_ffn", "down"),
    T.FFN_GATE_SHEXP: ("shared_expert", "gate"), T.FFN_UP_SHEXP: ("shared_expert", "up"),
    T.FFN_DOWN_SHEXP: ("shared_expert", "down"),
    T.FFN_GATE_EXP: ("routed_experts", "gate"), T.FFN_UP_EXP: ("routed_experts", "up"),
    T.FFN_DOWN_EXP: ("routed_experts", "down"),
}
EXPERT_TENSORS = {"gate": T.FFN_GATE_EXP, "up": T.FFN_UP_EXP, "down": T.FFN_DOWN_EXP}


@dataclass
class PlannedTensor:
    """One tensor of the file: its GGUF ``name``, numpy ``shape`` (rows on the last axis), where it comes from and
    the type chosen. ``load()`` returns its rows as matrices, in order (one per expert of a stacked tensor)."""

    name: str
    role: str  # a --types role, or "norm" (1-D tensors: always F32)
    projection: str | None
    layer: int | None
    shape: tuple[int, ...]
    source: SourceFormat
    choice: TypeChoice
    load: Callable[[], list[Matrix]]
    widened_experts: int = 0

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.choice.ggml_type, self.shape)


@dataclass
class TensorResult:
    """What writing one tensor measured against the source's weights."""

    rel_rmse: float
    max_abs: float
    scale_rounding: float = 0.0


@dataclass
class _Context:
    source: SourceModel
    architecture: Architecture
    table: TypeTable
    layer_mean: bool
    name_map: gguf.TensorNameMap = field(init=False)

    def __post_init__(self) -> None:
        self.name_map = gguf.get_tensor_name_map(self.architecture.arch,
                                                 int(self.source.text_config["num_hidden_layers"]))


# ----- planning -----------------------------------------------------------------------------------------------------

def _layer_of(gguf_name: str) -> int | None:
    match = re.match(r"blk\.(\d+)\.", gguf_name)
    return int(match.group(1)) if match else None


def _choose(context: _Context, role: str, projection: str | None, layer: int | None, source: SourceFormat,
            shape: tuple[int, ...], *, exact_allowed: bool = True) -> TypeChoice:
    if role == "norm":
        return TypeChoice(GGMLType.F32, "float")
    requested = context.table.lookup(role, projection, layer)
    if role == "router" and requested == "auto":
        requested = "F32"  # llama.cpp's tools never quantize routers: routing would move
    elif requested == "auto" and not source.quantized and context.source.is_quantized:
        # what a compressed model left in float (attention, shared experts, embeddings): near-lossless Q8_0,
        # wider than any quantized expert and half of bf16's bytes
        requested = "Q8_0"
    return choose_type(requested, source, shape[-1], layer_mean=context.layer_mean, exact_allowed=exact_allowed)


def _plain_format(source: SourceModel, key: str) -> SourceFormat:
    return SourceFormat(None, float_type=float_type_of(source.tensor_dtype(key)))


def _linear_format(source: SourceModel, path: str) -> SourceFormat:
    scheme = source.linear_scheme(path)
    if scheme is None:
        return _plain_format(source, f"{path}.weight")
    bits, symmetric, group_size = scheme
    return SourceFormat((bits,), symmetric, group_size, float_type_of(source.float_dtype))


def _gguf_name(context: _Context, hf_key: str) -> tuple[gguf.MODEL_TENSOR, str]:
    found = context.name_map.get_type_and_name(hf_key, try_suffixes=(".weight", ".bias"))
    arch_tensors = gguf.MODEL_TENSORS[context.architecture.arch]
    if found is None or found[0] not in arch_tensors:
        raise UnsupportedModelError(f"{context.source.folder}: tensor {hf_key} has no place in llama.cpp's "
                                    f"{context.architecture.name} architecture; this checkpoint cannot be written as GGUF")
    return found


def _plan_linear(context: _Context, path: str, hf_key: str) -> list[PlannedTensor]:
    """The tensor(s) of one linear (packed or plain) named ``hf_key`` in the checkpoint's naming."""
    source, architecture = context.source, context.architecture
    kind, name = _gguf_name(context, hf_key)
    layer = _layer_of(name)
    fmt = _linear_format(source, path)
    if architecture.split_kv_b and kind == T.ATTN_KV_B:
        return _plan_kv_b(context, path, layer, fmt)
    role, projection = ROLE_OF[kind]
    shape = tuple(source.linear_shape(path))
    config = source.text_config
    load = (lambda: [source.linear(path)])
    if architecture.permute_qk and kind in (T.ATTN_Q, T.ATTN_K):
        heads = int(config["num_attention_heads"] if kind == T.ATTN_Q else
                    config.get("num_key_value_heads") or config["num_attention_heads"])
        order = rope_pair_permutation(shape[0], heads)
        load = (lambda: [source.linear(path).take_rows(order)])
    choice = _choose(context, role, projection, layer, fmt, shape)
    return [PlannedTensor(name, role, projection, layer, shape, fmt, choice, load)]


def _plan_kv_b(context: _Context, path: str, layer: int, fmt: SourceFormat) -> list[PlannedTensor]:
    """DeepSeek's ``kv_b_proj`` ``[heads * (nope + v), kv_lora]`` as llama.cpp's two MLA tensors: ``attn_k_b``
    ``[heads, kv_lora, nope]`` (each head's key rows, transposed: rows change, so no exact path) and ``attn_v_b``
    ``[heads, v, kv_lora]`` (each head's value rows, as they are)."""
    source, config = context.source, context.source.text_config
    heads, kv_lora = int(config["num_attention_heads"]), int(config["kv_lora_rank"])
    nope, value = int(config["qk_nope_head_dim"]), int(config["v_head_dim"])
    key_rows, value_rows = kv_b_rows(config)

    def load_keys() -> list[Matrix]:
        keys = source.linear(path).values[key_rows].reshape(heads, nope, kv_lora).transpose(1, 2)
        return [Matrix(keys.reshape(heads * kv_lora, nope).contiguous())]

    def load_values() -> list[Matrix]:
        return [source.linear(path).take_rows(value_rows)]

    key_shape, value_shape = (heads, kv_lora, nope), (heads, value, kv_lora)
    # the transpose leaves no codes to carry over: a packed kv_b's key half is re-quantized, at Q8_0 unless the table
    # names a type (it is small: heads x kv_lora x nope per layer)
    key_format = fmt
    if fmt.quantized and context.table.lookup("attention", "k_b", layer) == "auto":
        key_format = SourceFormat((8,), True, 0, fmt.float_type)
    key_name = gguf.TENSOR_NAMES[T.ATTN_K_B].format(bid=layer) + ".weight"
    value_name = gguf.TENSOR_NAMES[T.ATTN_V_B].format(bid=layer) + ".weight"
    return [
        PlannedTensor(key_name, "attention", "k_b", layer, key_shape, fmt,
                      _choose(context, "attention", "k_b", layer, key_format, key_shape, exact_allowed=False),
                      load_keys),
        PlannedTensor(value_name, "attention", "v_b", layer, value_shape, fmt,
                      _choose(context, "attention", "v_b", layer, fmt, value_shape), load_values),
    ]


def _plan_plain(context: _Context, key: str) -> PlannedTensor:
    """A tensor stored as it is (norms, router, routing bias, embedding, an unpacked 2-D weight)."""
    source = context.source
    hf_key = key.replace("e_score_correction_bias", "e_score_correction.bias")
    kind, name = _gguf_name(context, hf_key)
    shape = tuple(source.tensor_shape(key))
    if len(shape) == 1:
        role, projection = "norm", None
    elif kind in ROLE_OF:
        role, projection = ROLE_OF[kind]
    else:
        raise UnsupportedModelError(f"{source.folder}: tensor {key} ({name}) is not one the GGUF export writes")
    layer = _layer_of(name)
    fmt = _plain_format(source, key)
    return PlannedTensor(name, role, projection, layer, shape, fmt, _choose(context, role, projection, layer, fmt, shape),
                         lambda: [Matrix(source.tensor(key).float())])


def _plan_experts(context: _Context, stack: ExpertStack) -> list[PlannedTensor]:
    """The three stacked tensors ``ffn_{gate,up,down}_exps`` ``[n_expert, out, in]`` of one MoE layer."""
    source = context.source
    fmt = SourceFormat(stack.bits, stack.symmetric, stack.group_size, float_type_of(source.float_dtype))
    widened = 0
    if stack.bits is not None:
        width, _ = layer_width(stack.bits, context.layer_mean)
        widened = sum(bits < width for bits in stack.bits)
    planned = []
    for projection, kind in EXPERT_TENSORS.items():
        name = gguf.TENSOR_NAMES[kind].format(bid=stack.layer) + ".weight"
        shape = (stack.count, *source.expert_shape(stack, projection))
        choice = _choose(context, "routed_experts", projection, stack.layer, fmt, shape)

        def load(projection=projection) -> list[Matrix]:
            return [source.expert(stack, expert, projection) for expert in range(stack.count)]

        planned.append(PlannedTensor(name, "routed_experts", projection, stack.layer, shape, fmt, choice, load,
                                     widened))
    return planned


def plan_tensors(context: _Context) -> list[PlannedTensor]:
    """Every tensor of the file, in llama.cpp's usual order (embedding, blocks, output), types chosen."""
    source = context.source
    stacks = source.expert_stacks()
    prefixes = tuple(f"{stack.prefix}." for stack in stacks.values())
    planned: list[PlannedTensor] = []
    for key in source.keys():
        if key.startswith(prefixes) or key.endswith((".weight_scale", ".weight_zero_point", ".weight_shape")):
            continue
        if key.endswith(".weight_packed"):
            path = key[: -len(".weight_packed")]
            planned += _plan_linear(context, path, f"{path}.weight")
        elif key.endswith(".weight") and len(source.tensor_shape(key)) == 2 and not key.endswith(
                ("embed_tokens.weight", "lm_head.weight", ".gate.weight")):
            planned += _plan_linear(context, key[: -len(".weight")], key)
        else:
            planned.append(_plan_plain(context, key))
    for stack in stacks.values():
        planned += _plan_experts(context, stack)
    names = {tensor.name for tensor in planned}
    if context.architecture.output_when_tied and "output.weight" not in names:
        embedding = next(tensor for tensor in planned if tensor.name == "token_embd.weight")
        choice = _choose(context, "output", None, None, embedding.source, embedding.shape)
        planned.append(PlannedTensor("output.weight", "output", None, None, embedding.shape, embedding.source, choice,
                                     embedding.load))

    def order(tensor: PlannedTensor) -> tuple:
        if tensor.layer is not None:
            return (1, tensor.layer, tensor.name)
        return (0 if tensor.name.startswith("token_embd") else 2, 0, tensor.name)

    return sorted(planned, key=order)


# ----- checks before writing ----------------------------------------------------------------------------------------

def check_experts(source: SourceModel) -> int:
    """llama.cpp needs every MoE layer to hold the same number of experts of one width; returns that number."""
    if source.record.get("variable_width"):
        raise UsageError(f"cannot export {source.folder} as GGUF: its experts have different widths (CAMERA-P "
                         "physical pruning) and llama.cpp stores a layer's experts as one tensor; re-run camera_p "
                         "with `pad_to: 64`")
    counts = {layer: stack.count for layer, stack in source.expert_stacks().items()}
    if not counts:
        raise UnsupportedModelError(f"{source.folder} has no routed experts; GGUF export writes MoE models")
    if len(set(counts.values())) > 1:
        summary = ", ".join(f"layer {layer}: {count}" for layer, count in list(counts.items())[:4])
        raise UsageError(f"cannot export {source.folder} as GGUF: its MoE layers keep different expert counts "
                         f"({summary}, ...) and llama.cpp has one expert_count; prune with `layer_budget: uniform`")
    return next(iter(counts.values()))


def read_export_source(path: Path) -> str | None:
    """The folder a GGUF file was exported from (our metadata key), None for another file."""
    try:
        field_ = gguf.GGUFReader(path).get_field(SOURCE_KEY)
    except Exception:  # not a GGUF file, or a damaged one: never ours to replace
        return None
    return None if field_ is None else field_.contents()


def check_gguf_output(source: Path, out: Path) -> Path:
    """``out`` must be a file path outside the input; an existing file is replaced only if it is an earlier GGUF
    export of the same folder."""
    source, out = Path(source).resolve(), Path(out).resolve()
    if out == source or source in out.parents:
        raise UsageError(f"--out {out} is inside the input folder {source}; export never writes into its input, pick "
                         "a file beside it")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; GGUF export writes one file, e.g. --out {out / 'model.gguf'}")
    if out.exists() and read_export_source(out) != str(source):
        raise UsageError(f"--out {out} already exists and is not an earlier GGUF export of {source}; pick a new name "
                         "or remove it")
    return out


# ----- writing ------------------------------------------------------------------------------------------------------

def encode_tensor(tensor: PlannedTensor) -> tuple[np.ndarray, TensorResult]:
    """The tensor's bytes ``[..., row bytes]`` and their error against the source's (dequantized) weights."""
    ggml = tensor.choice.ggml_type
    matrices = tensor.load()
    values = torch.cat([matrix.values.reshape(-1, tensor.shape[-1]) for matrix in matrices]).numpy()
    rounding = 0.0
    if tensor.choice.path in ("exact", "exact-offset"):
        data = np.concatenate([encode_exact(matrix.packed, ggml) for matrix in matrices])
        rounding = max(scale_rounding(matrix.packed) for matrix in matrices)
    else:
        data = encode_values(values, ggml)
    decoded = decode(data, ggml).reshape(values.shape)
    norm = float(np.linalg.norm(values))
    error = decoded.astype(np.float64) - values
    result = TensorResult(float(np.linalg.norm(error) / norm) if norm else float(np.linalg.norm(error)),
                          float(np.abs(error).max()) if error.size else 0.0, rounding)
    if not np.isfinite(decoded).all():
        raise UsageError(f"{tensor.name}: {ggml.name} gives non-finite weights (a scale beyond fp16's range); export "
                         "it in another type with --types")
    return data.reshape(*tensor.shape[:-1], -1), result


def _file_type(plan: list[PlannedTensor]) -> gguf.LlamaFileType:
    """``general.file_type``: the type holding most of the 2-D weights' bytes (informational for llama.cpp)."""
    by_type = Counter()
    for tensor in plan:
        if len(tensor.shape) > 1:
            by_type[tensor.choice.ggml_type] += tensor.nbytes
    dominant = by_type.most_common(1)[0][0]
    names = {GGMLType.F32: "ALL_F32", GGMLType.F16: "MOSTLY_F16", GGMLType.BF16: "MOSTLY_BF16",
             GGMLType.Q3_K: "MOSTLY_Q3_K_M", GGMLType.Q4_K: "MOSTLY_Q4_K_M", GGMLType.Q5_K: "MOSTLY_Q5_K_M"}
    return gguf.LlamaFileType[names.get(dominant, f"MOSTLY_{dominant.name}")]


def write_gguf(out: Path, context: _Context, plan: list[PlannedTensor], tokenizer, expert_count: int) -> list[TensorResult]:
    """Write the file under a temporary name beside ``out``, then rename it into place."""
    source, architecture = context.source, context.architecture
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    results = []
    try:
        writer = gguf.GGUFWriter(partial, architecture.name)
        writer.add_name(source.folder.name)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_file_type(_file_type(plan))
        writer.add_string(SOURCE_KEY, str(source.folder.resolve()))
        writer.add_string("moecompress.version", __version__)
        write_hyperparameters(writer, architecture, source.text_config, expert_count=expert_count,
                              vocab_size=len(tokenizer.tokens))
        tokenizer.write(writer)
        for tensor in plan:
            row_bytes = tensor.nbytes // max(int(np.prod(tensor.shape[:-1])), 1)
            writer.add_tensor_info(tensor.name, (*tensor.shape[:-1], row_bytes), np.dtype(np.uint8), tensor.nbytes,
                                   raw_dtype=tensor.choice.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in plan:
            data, result = encode_tensor(tensor)
            writer.write_tensor_data(data)
            results.append(result)
        writer.close()
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return results


def export_gguf(source: str | Path, out: str | Path, *, types: str | TypeTable | None = None,
                layer_mean: bool = False) -> dict:
    """Write ``out`` (a ``.gguf`` file) from the model folder ``source``; returns the report (also written beside
    it as ``<stem>.export_report.json``). See the module docstring."""
    model = SourceModel(source)
    try:
        out = check_gguf_output(model.folder, Path(out))
        context, plan, expert_count, tokenizer = _prepare(model, types, layer_mean)
        results = write_gguf(out, context, plan, tokenizer, expert_count)
        report = build_report(model, out, context.architecture, plan, results)
    finally:
        model.close()
    write_json_atomic(report_path(out), report)
    return report


def _prepare(model: SourceModel, types: str | TypeTable | None, layer_mean: bool):
    """Every check that can refuse the export, and the plan: ``(context, plan, expert count, tokenizer)``."""
    architecture = architecture_of(model.model_type)
    check_config(architecture, model.text_config)
    expert_count = check_experts(model)
    tokenizer = tokenizer_metadata(model.folder, int(model.text_config.get("vocab_size") or 0))
    table = types if isinstance(types, TypeTable) else TypeTable.parse(types)
    context = _Context(model, architecture, table, layer_mean)
    return context, plan_tensors(context), expert_count, tokenizer


def plan_export(source: str | Path, *, types: str | TypeTable | None = None,
                layer_mean: bool = False) -> list[PlannedTensor]:
    """The tensors :func:`export_gguf` would write, with their types and sizes, without writing (e.g. to match a
    file size)."""
    model = SourceModel(source)
    try:
        return _prepare(model, types, layer_mean)[1]
    finally:
        model.close()


def report_path(out: Path) -> Path:
    return Path(out).with_name(f"{Path(out).stem}.export_report.json")


def build_report(source: SourceModel, out: Path, architecture: Architecture, plan: list[PlannedTensor],
                 results: list[TensorResult]) -> dict:
    """The export report; its summary keys are the other exports' (``render_report`` prints it)."""
    tensors, by_type, notes_by_text = [], {}, {}
    parameters = expert_parameters = payload = expert_payload = widened = 0
    for tensor, result in zip(plan, results):
        count = int(np.prod(tensor.shape))
        parameters += count
        payload += tensor.nbytes
        if tensor.role == "routed_experts":
            expert_parameters += count
            expert_payload += tensor.nbytes
            # widening is lossless where the wider type holds the narrower codes (the exact paths)
            exact = tensor.choice.path.startswith("exact")
            widened += tensor.widened_experts if tensor.projection == "gate" and exact else 0
        entry = by_type.setdefault(tensor.choice.ggml_type.name, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += tensor.nbytes
        tensors.append({
            "name": tensor.name, "type": tensor.choice.ggml_type.name, "path": tensor.choice.path,
            "shape": list(tensor.shape), "role": tensor.role, "source_bits": list(tensor.source.bits or []),
            "rel_rmse": result.rel_rmse, "max_abs_error": result.max_abs, "scale_rounding": result.scale_rounding,
            "notes": list(tensor.choice.notes),
        })
        for note in tensor.choice.notes:
            notes_by_text.setdefault(note, []).append(tensor.name.removesuffix(".weight"))
    notes = [f"{text}: {', '.join(names[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3 else "")
             for text, names in notes_by_text.items()]
    requantized = [row for row in tensors if row["path"] == "requantized" and row["source_bits"]]
    if requantized:
        worst = max(requantized, key=lambda row: row["rel_rmse"])
        notes.append(f"{len(requantized)} quantized tensor(s) re-quantized to another type; largest added error "
                     f"{worst['rel_rmse']:.4f} (relative RMS) in {worst['name']} ({worst['type']})")
    return {
        "format": FORMAT,
        "source": str(source.folder.resolve()),
        "out": str(out),
        "architecture": architecture.name,
        "bytes_on_disk": out.stat().st_size,
        "source_bytes_on_disk": checkpoint_bytes(source.folder).get("total", 0),
        "parameters": parameters,
        "bits_per_parameter": 8 * payload / max(parameters, 1),
        "expert_parameters": expert_parameters,
        "expert_bits_per_parameter": 8 * expert_payload / expert_parameters if expert_parameters else None,
        "widened_experts": widened,
        "tensor_parallel_size": 1,
        "types": by_type,
        "tensors": tensors,
        "load": {
            "llama.cpp": f"llama-cli -m {out}",
            "llama-cpp-python": f"python -c \"from llama_cpp import Llama; Llama('{out}')\"",
        },
        "notes": notes,
    }

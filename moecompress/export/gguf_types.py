"""GGML tensor types for the GGUF export: sizes, encoders, the exact paths from our packed codes, and the choice of a
type for each tensor (the ``--types`` role table, the widths a native folder holds, the row-length fallbacks).

**Exact paths.** Our packed weights are ``w = (q - z) * s`` per group of input columns (see
:mod:`moecompress.kernels.layout`). Where a GGML 32-element block type has the same form, the codes are written as
they are, only the scale is rounded to fp16 (``d``):

* ``Q8_0`` (``w = d * q``, int8 ``q``) holds symmetric codes of any width up to 8 bits;
* ``Q4_0`` (``w = d * (u - 8)``, ``u`` in 0..15) holds symmetric codes of up to 4 bits (``u = q + 8``): 4-bit codes
  bit for bit, narrower ones losslessly at 4.5 bits per weight;
* ``Q4_1`` (``w = d * u + m``) holds asymmetric codes of up to 4 bits with ``d = s`` and ``m = -s (8 + z)``, so the
  offset ``m`` is rounded to fp16 as well.

A group of ``g`` columns (a multiple of 32) spans ``g / 32`` blocks that all get its scale. The only change is the
fp16 rounding of ``s`` (and ``m``): a bf16 scale between 2^-17 and 65504 converts exactly (8 significant bits fit
fp16's 11), an fp32 scale moves by at most 2^-11 of itself (half an fp16 ulp), so a weight moves by at most
``2^-11 |s| |q - z|``. :func:`scale_rounding` measures it per tensor.

**Re-quantization.** Every other case (2/3-bit codes in K-quants, asymmetric 8 bits, a type the user asked for)
quantizes the dequantized weights again with llama.cpp's reference quantizers (:mod:`moecompress.export.gguf_kquants`
for the K-quants, the ``gguf`` package for the 32-element types); the exporter reports the error this adds.

**Row lengths.** GGML needs a tensor's row length (its input width) to be a multiple of the type's block: 256 for
K-quants, 32 for the others. A row that does not fit takes, first, a lossless container for its codes (Q4_0 / Q4_1 /
Q8_0) where one fits, then llama-quantize's fallback (``tensor_type_fallback``: Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0,
Q5_K -> Q5_1, Q6_K -> Q8_0), then F16.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gguf
import numpy as np
import torch

from moecompress.errors import UsageError
from moecompress.export.gguf_kquants import QUANTIZERS as KQUANT_QUANTIZERS
from moecompress.kernels.layout import PackedLinearWeight

GGMLType = gguf.GGMLQuantizationType
FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
BLOCK32_TYPES = (GGMLType.Q8_0, GGMLType.Q5_1, GGMLType.Q5_0, GGMLType.Q4_1, GGMLType.Q4_0)
KQUANT_TYPES = (GGMLType.Q6_K, GGMLType.Q5_K, GGMLType.Q4_K, GGMLType.Q3_K, GGMLType.Q2_K)
WRITABLE_TYPES = (*FLOAT_TYPES, *BLOCK32_TYPES, *KQUANT_TYPES)
# llama-quantize's substitutes for a row its block does not divide (llama-quant.cpp, tensor_type_fallback)
FALLBACK = {GGMLType.Q2_K: GGMLType.Q4_0, GGMLType.Q3_K: GGMLType.Q4_0, GGMLType.Q4_K: GGMLType.Q5_0,
            GGMLType.Q5_K: GGMLType.Q5_1, GGMLType.Q6_K: GGMLType.Q8_0}
# The type a width maps to when the table says "auto": the exact container where the format agrees (8 and 4 bits),
# else the K-quant of that width (1-bit experts go to Q2_K, the narrowest writable type).
AUTO_TYPE = {8: GGMLType.Q8_0, 3: GGMLType.Q3_K, 2: GGMLType.Q2_K, 1: GGMLType.Q2_K}
AUTO_WIDTHS = (1, 2, 3, 4, 8)

ROLES = ("embedding", "output", "attention", "shared_expert", "dense_ffn", "routed_experts", "router")
PROJECTIONS = {
    "attention": ("q", "k", "v", "output", "q_a", "q_b", "kv_a", "k_b", "v_b"),
    "shared_expert": ("gate", "up", "down"),
    "dense_ffn": ("gate", "up", "down"),
    "routed_experts": ("gate", "up", "down"),
}


def type_names() -> str:
    return ", ".join(t.name for t in WRITABLE_TYPES)


def ggml_type(name: str) -> GGMLType:
    """The writable GGML type called ``name`` (case-insensitive); a UsageError naming the choices otherwise."""
    try:
        found = GGMLType[name.upper()]
    except KeyError:
        raise UsageError(f"{name!r} is not a GGML type; use one of {type_names()}") from None
    if found not in WRITABLE_TYPES:
        raise UsageError(f"{found.name} cannot be written (the gguf library has no quantizer for it and neither do "
                         f"we); use one of {type_names()}")
    return found


def block_shape(ggml: GGMLType) -> tuple[int, int]:
    """``(values per block, bytes per block)``."""
    return gguf.GGML_QUANT_SIZES[ggml]


def row_fits(ggml: GGMLType, row_length: int) -> bool:
    return row_length % block_shape(ggml)[0] == 0


def tensor_bytes(ggml: GGMLType, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of numpy ``shape`` (rows are the last axis) stored as ``ggml``."""
    values, size = block_shape(ggml)
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // values) * size


# ----- encoding ---------------------------------------------------------------------------------------------------

def encode_values(values: np.ndarray, ggml: GGMLType) -> np.ndarray:
    """float values ``[..., n]`` -> the tensor's bytes ``[..., row bytes]`` (uint8), quantized by llama.cpp's
    reference algorithm for ``ggml`` (no importance matrix)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    rows = values.reshape(-1, values.shape[-1])
    # rows are independent: a few million values at a time bound the quantizers' temporaries (many per value)
    step = max(1, _CHUNK_VALUES // rows.shape[1])
    parts = [_encode_rows(rows[start:start + step], ggml) for start in range(0, rows.shape[0], step)]
    return np.concatenate(parts).reshape(*values.shape[:-1], -1)


_CHUNK_VALUES = 1 << 22


def _encode_rows(rows: np.ndarray, ggml: GGMLType) -> np.ndarray:
    if ggml in KQUANT_TYPES:
        return KQUANT_QUANTIZERS[ggml.name](rows).reshape(rows.shape[0], -1)
    return np.ascontiguousarray(gguf.quants.quantize(rows, ggml)).view(np.uint8).reshape(rows.shape[0], -1)


def decode(data: np.ndarray, ggml: GGMLType) -> np.ndarray:
    """A tensor's bytes ``[..., row bytes]`` -> float32 values ``[..., n]`` (the ``gguf`` package's dequantizers)."""
    if ggml == GGMLType.F32:
        return data.view(np.float32)
    if ggml == GGMLType.F16:
        return data.view(np.float16).astype(np.float32)
    return gguf.quants.dequantize(data, ggml).astype(np.float32, copy=False)


def exact_container(ggml: GGMLType, bits: int, symmetric: bool, group_size: int, row_length: int) -> bool:
    """Whether ``ggml`` holds packed codes of this scheme exactly (up to the fp16 scale; see the module docstring)."""
    group = row_length if group_size <= 0 else group_size
    if row_length % 32 or group % 32:
        return False
    if ggml == GGMLType.Q8_0:
        return symmetric and bits <= 8
    if ggml == GGMLType.Q4_0:
        return symmetric and bits <= 4
    if ggml == GGMLType.Q4_1:
        return bits <= 4
    return False


def _block_scales(packed: PackedLinearWeight) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales and zero points per 32-column block: float32 ``[out, in / 32]`` each (zeros None if symmetric)."""
    repeat = packed.effective_group_size // 32
    scales = packed.scales.float().repeat_interleave(repeat, dim=-1)[..., : packed.shape[1] // 32]
    zeros = None
    if packed.zeros is not None:
        zeros = packed.zeros.float().repeat_interleave(repeat, dim=-1)[..., : packed.shape[1] // 32].numpy()
    return scales.numpy(), zeros


def _fp16(values: np.ndarray, what: str) -> np.ndarray:
    half = values.astype(np.float32).astype(np.float16)
    if not np.isfinite(half).all():
        raise UsageError(f"{what} does not fit fp16 (|value| > 65504); export this tensor re-quantized with --types")
    return half


def encode_exact(packed: PackedLinearWeight, ggml: GGMLType) -> np.ndarray:
    """Our packed matrix ``[out, in]`` as ``ggml`` blocks ``[out, row bytes]`` with its own codes (see
    :func:`exact_container`)."""
    out_features, in_features = packed.shape
    blocks = in_features // 32
    codes = packed.codes().numpy().reshape(out_features, blocks, 32)
    scales, zeros = _block_scales(packed)
    d = _fp16(scales, "a group scale").view(np.uint8).reshape(out_features, blocks, 2)
    if ggml == GGMLType.Q8_0:
        parts = [d, codes.astype(np.int8).view(np.uint8)]
    else:
        unsigned = (codes.astype(np.int16) + 8).astype(np.uint8)  # 0..15
        nibbles = unsigned[..., :16] | (unsigned[..., 16:] << 4)  # element j low, element j + 16 high
        if ggml == GGMLType.Q4_0:
            parts = [d, nibbles]
        else:  # Q4_1: w = d * u + m with m = -s (8 + z)
            offset = -scales * (8.0 + (zeros if zeros is not None else 0.0))
            m = _fp16(offset, "a group offset -scale * (8 + zero)").view(np.uint8).reshape(out_features, blocks, 2)
            parts = [d, m, nibbles]
    return np.concatenate(parts, axis=-1).reshape(out_features, -1)


def scale_rounding(packed: PackedLinearWeight) -> float:
    """Largest relative change of a scale rounded to fp16 (0.0 when every scale converts exactly)."""
    scales = packed.scales.float()
    rounded = scales.half().float()
    nonzero = scales != 0
    if not bool(nonzero.any()):
        return 0.0
    return float(((rounded - scales).abs()[nonzero] / scales.abs()[nonzero]).max())


# ----- choosing a type ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceFormat:
    """What the source holds for one GGUF tensor: packed ``bits`` (one per expert of a stacked tensor, one for a
    linear) with their scheme, or float weights (``bits`` None) whose dtype maps to ``float_type``."""

    bits: tuple[int, ...] | None
    symmetric: bool = True
    group_size: int = 0
    float_type: GGMLType = GGMLType.BF16

    @property
    def quantized(self) -> bool:
        return self.bits is not None


@dataclass(frozen=True)
class TypeChoice:
    """The type of one tensor and how its bytes come about: ``float`` (a float type), ``exact`` (our codes, fp16
    scales), ``exact-offset`` (Q4_1: also the offset rounded to fp16) or ``requantized``."""

    ggml_type: GGMLType
    path: str
    notes: tuple[str, ...] = ()


def float_type_of(dtype: torch.dtype) -> GGMLType:
    return {torch.bfloat16: GGMLType.BF16, torch.float16: GGMLType.F16}.get(dtype, GGMLType.F32)


def layer_width(bits: tuple[int, ...], layer_mean: bool) -> tuple[int, str | None]:
    """One width for a stack of experts: the widest (default), or the mean rounded to the nearest width of
    :data:`AUTO_WIDTHS` (ties up). Returns the width and a note when the experts differ."""
    distinct = sorted(set(bits))
    if len(distinct) == 1:
        return distinct[0], None
    if not layer_mean:
        return distinct[-1], f"widened: experts at {distinct} bits stored at {distinct[-1]} bits"
    mean = sum(bits) / len(bits)
    width = min(AUTO_WIDTHS, key=lambda candidate: (abs(candidate - mean), -candidate))
    return width, f"layer mean: experts at {distinct} bits (mean {mean:.2f}) stored at {width} bits"


def choose_type(requested: str, source: SourceFormat, row_length: int, *, layer_mean: bool = False,
                exact_allowed: bool = True) -> TypeChoice:
    """The type of a tensor whose table entry is ``requested`` (a type name or ``auto``), see the module docstring.

    ``exact_allowed`` is False where the export changes the layout of the rows (a transpose), so that codes cannot be
    carried over."""
    notes: list[str] = []
    width = None
    if source.quantized:
        width, note = layer_width(source.bits, layer_mean)
        if note:
            notes.append(note)
    if requested == "auto":
        if not source.quantized:
            chosen = source.float_type
        elif width == 4:
            chosen = GGMLType.Q4_0 if source.symmetric else GGMLType.Q4_1
        else:
            chosen = AUTO_TYPE[width]
    else:
        chosen = ggml_type(requested)

    def holds_codes(ggml: GGMLType) -> bool:
        # every expert's codes must fit, the widest included (the layer mean may be narrower than some)
        return (exact_allowed and source.quantized
                and exact_container(ggml, max(source.bits), source.symmetric, source.group_size, row_length))

    if not row_fits(chosen, row_length):
        container = next((ggml for ggml in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0) if holds_codes(ggml)), None)
        if container is not None and chosen not in FLOAT_TYPES:
            notes.append(f"row of {row_length} is not a multiple of {block_shape(chosen)[0]} ({chosen.name}): "
                         f"{container.name} holds the {max(source.bits)}-bit codes exactly")
            chosen = container
        else:
            wanted = chosen
            while not row_fits(chosen, row_length):
                chosen = FALLBACK.get(chosen, GGMLType.F16)
            notes.append(f"row of {row_length} is not a multiple of {block_shape(wanted)[0]} ({wanted.name}): "
                         f"{chosen.name} instead")
    if chosen in FLOAT_TYPES:
        path = "float"
    elif holds_codes(chosen):
        path = "exact-offset" if chosen == GGMLType.Q4_1 else "exact"
    else:
        path = "requantized"
    return TypeChoice(chosen, path, tuple(notes))


# ----- the --types table --------------------------------------------------------------------------------------------

_ENTRY = re.compile(r"^(?P<role>[a-z_]+)(?:\.(?P<projection>[a-z_]+))?(?:@(?P<first>\d+)(?:-(?P<last>\d+))?)?$")


@dataclass(frozen=True)
class TypeRule:
    role: str
    projection: str | None
    layers: tuple[int, int] | None
    type_name: str  # a GGML type name or "auto"

    def matches(self, role: str, projection: str | None, layer: int | None) -> bool:
        if role != self.role or (self.projection is not None and projection != self.projection):
            return False
        return self.layers is None or (layer is not None and self.layers[0] <= layer <= self.layers[1])


@dataclass(frozen=True)
class TypeTable:
    """``--types``: rules ``ROLE[.PROJECTION][@LAYER[-LAST]]=TYPE``; the last rule that matches a tensor wins, and a
    tensor no rule names is ``auto`` (what the source holds: the width's type, or the float dtype).

    Roles: embedding, output, attention, shared_expert, dense_ffn, routed_experts, router (F32, F16 or BF16 only).
    Norms and the routing bias are always F32."""

    rules: tuple[TypeRule, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> "TypeTable":
        if not text:
            return cls()
        rules = []
        for entry in (part.strip() for part in text.split(",") if part.strip()):
            key, separator, value = entry.partition("=")
            match = _ENTRY.match(key.strip())
            if not separator or match is None:
                raise UsageError(f"--types entry {entry!r} is not ROLE[.PROJECTION][@LAYERS]=TYPE, e.g. "
                                 "routed_experts=Q3_K,routed_experts.down@0-1=Q4_K,attention=Q6_K")
            role, projection = match["role"], match["projection"]
            if role not in ROLES:
                raise UsageError(f"--types: unknown role {role!r}; roles are {', '.join(ROLES)}")
            if projection is not None and projection not in PROJECTIONS.get(role, ()):
                raise UsageError(f"--types: {role} has no projection {projection!r}; it has "
                                 f"{', '.join(PROJECTIONS.get(role, ())) or 'none'}")
            type_name = value.strip().upper()
            if type_name != "AUTO":
                ggml = ggml_type(type_name)
                if role == "router" and ggml not in FLOAT_TYPES:
                    raise UsageError("--types: the router stays float (F32, F16 or BF16); llama.cpp's tools never "
                                     "quantize it")
            layers = None
            if match["first"] is not None:
                first = int(match["first"])
                layers = (first, int(match["last"]) if match["last"] is not None else first)
            rules.append(TypeRule(role, projection, layers, "auto" if type_name == "AUTO" else type_name))
        return cls(tuple(rules))

    def lookup(self, role: str, projection: str | None = None, layer: int | None = None) -> str:
        chosen = "auto"
        for rule in self.rules:
            if rule.matches(role, projection, layer):
                chosen = rule.type_name
        return chosen

"""The compressed-tensors consumer matrix: every shape of folder ``export --format compressed-tensors`` can write,
on every test-bed model, loaded by plain transformers in a process that never imports moecompress.

Each case is exported (or refused) here; all written folders are then loaded in ONE fresh Python with
``AutoModelForCausalLM.from_pretrained(folder, dtype=float32)`` (the installed transformers and compressed-tensors)
and run on :data:`export_helpers.INPUT_IDS`. The outcome of a case is one of

* ``exact``: the logits equal those of our native model's dequantized weights, with the expert weights rounded to
  bf16 as transformers' compressed-tensors loader stores them (it decodes experts in the scales' dtype), run
  through the same transformers forward: ``max |diff| <= EXACT_BOUND``. ``vs_native`` is the gap to our unrounded
  packed model (fp32 dequantization): the bf16 rounding itself;
* ``raises``: ``from_pretrained`` (or the forward) raised; the first line of the error is kept;
* ``refused``: the exporter refused the shape (one line, the message), nothing was written;
* ``WRONG``: anything else (loaded, but other logits): the outcome this matrix exists to rule out.

``python tests/export_matrix.py`` prints the table (the README's "Exact or refused" section).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from export_helpers import INPUT_IDS, native_folder

EXACT_BOUND = 1e-5  # fp32 logits of the same weights through the same code: equal up to summation order (1 thread)
GROUP_SIZE = {"moe-ref-q3": 16, "moe-ref-mx": 32, "moe-ref-ds": 32}  # q3's experts are 80 wide: group 16
MODELS = tuple(GROUP_SIZE)

_LOAD = r"""
import json, logging, re, sys, torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
out, ids, folders = sys.argv[1], torch.tensor(json.loads(sys.argv[2])), sys.argv[3:]
reports = []  # transformers' load report (its CONVERSION entries carry the cause of a conversion error)
handler = logging.Handler()
handler.emit = lambda record: reports.append(record.getMessage())
logging.getLogger("transformers").addHandler(handler)
results = {}
for folder in folders:
    reports.clear()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        # transformers' compressed-tensors loader leaves decoded experts in the scales' dtype (bf16): compute in fp32
        for parameter in model.parameters():
            if parameter.is_floating_point():
                parameter.data = parameter.data.float()
        with torch.no_grad():
            results[folder] = {"logits": model(ids).logits}
    except Exception as error:
        causes, cause = [], error
        while cause is not None and len(causes) < 4:
            causes.append(f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}")
            cause = cause.__cause__ or cause.__context__
        found = re.search(r"(\w+Error: [^\n|]*?)\s*(?:\||$)", "\n".join(reports), re.M)
        results[folder] = {"error": " <- ".join(causes) + (f" (cause: {found.group(1).strip()})" if found else "")}
torch.save({"results": results, "moecompress_imported": "moecompress" in sys.modules}, out)
"""


@dataclass
class Case:
    """One export: ``shape`` (a name), the native folder's options, the export's options, the outcome expected."""

    model: str
    shape: str
    native: dict
    export: dict
    expected: str  # exact / raises / refused
    refusal: str = ""  # a part of the refusal message, for expected == "refused"
    outcome: str = ""
    detail: str = ""
    max_diff: float | None = None
    vs_native: float | None = None
    folder: Path | None = None
    native_folder: Path | None = None
    load: list[str] = field(default_factory=list)


def _layer_widths(layer: int, expert: int) -> int:
    return (2, 3, 4)[layer % 3]


def _demo_widths(layer: int, expert: int) -> int:
    return (4, 3, 2, 4, 3, 2)[layer]  # one width per MoE layer, 3 on average, as the demo's PMQ chooses


def _in_layer_widths(layer: int, expert: int) -> int:
    return (2, 4)[expert % 2]


def cases(models=MODELS) -> list[Case]:
    """The matrix: (shape x model). ``native`` keys go to :func:`export_helpers.native_folder`."""
    found = []
    for model in models:
        group = GROUP_SIZE[model]
        for bits in (2, 3, 4, 8):
            found.append(Case(model, f"uniform {bits}-bit", dict(bits=bits, group_size=group), {}, "exact"))
        mixed = dict(group_size=group, bit_map=_layer_widths)
        found += [
            Case(model, "per-layer 2/3/4-bit", mixed, {}, "refused", "--widen-to-model-max"),
            Case(model, "per-layer 2/3/4-bit, --for vllm", mixed, {"consumer": "vllm"}, "raises"),
            Case(model, "per-layer 2/3/4-bit, --widen-to-model-max", mixed, {"widen_to_model_max": True}, "exact"),
        ]
        in_layer = dict(group_size=group, bit_map=_in_layer_widths)
        found += [
            Case(model, "2/4-bit inside each layer", in_layer, {}, "refused", "--widen-to-layer-max"),
            Case(model, "2/4-bit inside each layer, --widen-to-layer-max", in_layer, {"widen_to_layer_max": True},
                 "exact"),
        ]
        asymmetric = dict(bits=4, group_size=group, symmetric=False)
        found += [
            Case(model, "asymmetric 4-bit", asymmetric, {}, "refused", "symmetric: true"),
            Case(model, "asymmetric 4-bit, --for vllm", asymmetric, {"consumer": "vllm"}, "raises"),
        ]
    if "moe-ref-ds" in models:
        found.append(Case("moe-ref-ds", "4-bit routed + shared experts + attention",
                          dict(bits=4, group_size=32, targets=("routed_experts", "shared_experts", "attention")), {},
                          "exact"))
    if "moe-ref-q3" in models:
        demo = dict(group_size=16, bit_map=_demo_widths, keep=lambda views: {v.layer_index: list(range(24)) for v in views})
        found += [
            Case("moe-ref-q3", "demo shape (24 of 32 experts, 4/3/2-bit per layer)", demo, {}, "refused",
                 "--for vllm"),
            Case("moe-ref-q3", "demo shape, --for vllm", demo, {"consumer": "vllm"}, "raises"),
            Case("moe-ref-q3", "demo shape, --widen-to-model-max", demo, {"widen_to_model_max": True}, "exact"),
        ]
    return found


def build(all_cases: list[Case], tmp: Path) -> None:
    """Quantize (RTN, minmax scales: fast) each distinct native folder once and export every case; a refusal is
    recorded as the case's outcome."""
    from moecompress.errors import MoECompressError
    from moecompress.export import export_folder

    natives: dict[str, Path] = {}
    for number, case in enumerate(all_cases):
        key = f"{case.model}-{_native_key(case.native)}"
        if key not in natives:
            folder = tmp / f"native{len(natives)}"
            folder.mkdir()
            natives[key] = native_folder(folder, case.model, scale_search="minmax", **case.native)
        case.native_folder = natives[key]
        out = tmp / f"ct{number}"
        try:
            report = export_folder(case.native_folder, out, "compressed-tensors", **case.export)
        except MoECompressError as error:
            case.outcome, case.detail = "refused", str(error).split(": ", 1)[-1]
            assert not out.exists()
            continue
        case.folder, case.load = out, sorted(report["load"])


def _native_key(options: dict) -> str:
    return json.dumps({key: getattr(value, "__name__", value) for key, value in sorted(options.items())}, default=str)


def load_in_plain_transformers(folders: list[Path], tmp: Path) -> dict[str, dict]:
    """``{folder: {"logits"} or {"error"}}`` from one fresh Python that never imports moecompress (checked)."""
    out = tmp / "plain-results.pt"
    result = subprocess.run([sys.executable, "-c", _LOAD, str(out), json.dumps(INPUT_IDS.tolist()),
                             *map(str, folders)], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(out)
    assert not loaded["moecompress_imported"]
    return loaded["results"]


def reference_logits(native: Path, *, round_experts: bool) -> torch.Tensor:
    """Our native model's weights, dequantized, through transformers' plain forward (fp32, one thread): the routed
    experts rounded to bf16 when ``round_experts`` (as transformers' compressed-tensors loader stores them), other
    quantized linears in fp32 (it decodes those in the loaded scales' dtype, fp32); without rounding: our packed
    model's own logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import moecompress  # noqa: F401  (registers the native format)
    from moecompress.kernels.backend import PackedExperts
    from moecompress.kernels.linear import PackedLinear

    torch.set_num_threads(1)
    packed = AutoModelForCausalLM.from_pretrained(native, dtype=torch.float32)
    if not round_experts:
        with torch.no_grad():
            return packed(INPUT_IDS).logits
    state, replaced = {}, []
    for name, module in packed.named_modules():
        if isinstance(module, PackedExperts):
            for projection in ("gate_up_proj", "down_proj"):
                weights = [module.expert_linear(e, projection).dequantize(torch.float32) for e in range(module.num_experts)]
                state[f"{name}.{projection}"] = torch.stack(weights).to(torch.bfloat16).float()
            replaced.append(name + ".")
        elif isinstance(module, PackedLinear):
            state[f"{name}.weight"] = module.packed_weight().dequantize(torch.float32)
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.float()
            replaced.append(name + ".")
    state.update({key: value for key, value in packed.state_dict().items()
                  if not any(key.startswith(prefix) for prefix in replaced)})
    config = AutoConfig.from_pretrained(native)
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= set(plain.all_tied_weights_keys or {}), (missing, unexpected)
    plain.tie_weights()
    plain.eval()
    with torch.no_grad():
        return plain(INPUT_IDS).logits


def run_matrix(tmp: Path, models=MODELS) -> list[Case]:
    """Build, load and classify every case (see the module docstring)."""
    all_cases = cases(models)
    build(all_cases, tmp)
    written = [case for case in all_cases if case.folder is not None]
    results = load_in_plain_transformers([case.folder for case in written], tmp)
    references: dict[tuple[Path, bool], torch.Tensor] = {}
    for case in written:
        result = results[str(case.folder)]
        if "error" in result:
            case.outcome, case.detail = "raises", result["error"]
            continue
        for rounded in (True, False):
            if (case.native_folder, rounded) not in references:
                references[case.native_folder, rounded] = reference_logits(case.native_folder, round_experts=rounded)
        case.max_diff = float((result["logits"] - references[case.native_folder, True]).abs().max())
        case.vs_native = float((result["logits"] - references[case.native_folder, False]).abs().max())
        case.outcome = "exact" if case.max_diff <= EXACT_BOUND else "WRONG"
    return all_cases


def versions() -> str:
    return ", ".join(f"{name} {metadata.version(name)}" for name in ("transformers", "compressed-tensors", "torch"))


def table(all_cases: list[Case]) -> str:
    lines = [f"Plain transformers ({versions()}), fp32 logits on 2 x 20 tokens:", "",
             "| model | export shape | outcome | detail |", "|---|---|---|---|"]
    for case in all_cases:
        if case.outcome == "exact":
            detail = (f"max diff {case.max_diff:.1e} vs our weights rounded to bf16; {case.vs_native:.3g} vs our "
                      "packed model (fp32)")
        elif case.outcome == "raises" and "(cause: " in case.detail:
            detail = "from_pretrained raises: " + case.detail.rsplit("(cause: ", 1)[1].rstrip(")")
        else:
            detail = case.detail.replace("|", "\\|")
        lines.append(f"| {case.model} | {case.shape} | {case.outcome} | {detail} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        print(table(run_matrix(Path(folder), tuple(sys.argv[1:]) or MODELS)))

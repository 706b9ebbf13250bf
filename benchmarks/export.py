"""Round trips of the compressed-tensors export on the three test-bed models (deterministic, CPU only).

For each model, at 4 bits (every MoE layer) and at a mixed per-layer allocation (4, 3, 2, 8, 4, 3 bits by MoE layer
position; exported ``--for vllm`` and ``--widen-to-model-max``), RTN-quantised routed experts (group 16 for moe-ref-q3, whose expert width 80 is not a multiple of 32;
group 32 otherwise):

1. save the native folder (``from_pretrained`` after ``import moecompress``);
2. ``moecompress export --format compressed-tensors`` and ``--format hf --dequantize`` (our dequantised weights);
3. compressed-tensors' own ``PackedQuantizationCompressor.decompress`` on every expert vs our dequantised weights;
4. a fresh Python that never imports moecompress loads both exports with plain ``AutoModelForCausalLM`` (fp32
   compute) and returns logits; compared with our packed model's logits (fp32 compute).

Columns: bytes on disk (native, compressed-tensors, hf-dequantized), expert bits per parameter, library
decompression max |diff|, "CT vs deq": max |logit diff| of the CT folder vs our dequantised weights, both in plain
transformers (0 = the folder loads to exactly our weights), "CT vs ours": vs our packed model (fp32 dequantisation;
transformers rounds dequantised experts to bf16, so not 0), the same with our dequantised weights rounded to bf16
(the rounding is the whole difference), the load error when plain transformers refuses (a ``--for vllm`` folder),
and "read back": the export loaded by moecompress itself (``load_model``, every module with its own scheme, fp32)
vs our packed model.

    python benchmarks/export.py [--work /tmp/export-bench] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from _common import add_repo_to_path, set_threads, testbed_model

add_repo_to_path()

MODELS = {"moe-ref-q3": 16, "moe-ref-mx": 32, "moe-ref-ds": 32}
MIXED = (4, 3, 2, 8, 4, 3)
INPUT_IDS = torch.arange(2 * 24).reshape(2, 24) * 37 % 8000 + 5

_PLAIN = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
out, ids, folders = sys.argv[1], torch.tensor(json.loads(sys.argv[2])), sys.argv[3:]
results = {}
for folder in folders:
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except Exception as error:
        lines = [line for line in str(error).splitlines() if line.strip()]
        results[folder] = f"{type(error).__name__}: {lines[0] if lines else ''}"
        continue
    for parameter in model.parameters():
        if parameter.is_floating_point():
            parameter.data = parameter.data.float()
    with torch.no_grad():
        results[folder] = model(ids).logits
results["moecompress_imported"] = "moecompress" in sys.modules
torch.save(results, out)
"""


def native(work: Path, name: str, group_size: int, mixed: bool) -> Path:
    from moecompress.checkpoint import load_model, save_model
    from moecompress.models import find_moe_blocks
    from moecompress.quantization.sequential import QuantizationSettings, quantize_model

    model, tokenizer = load_model(testbed_model(name), dtype=torch.bfloat16)
    bit_map = None
    if mixed:
        bit_map = {(view.layer_index, expert): MIXED[position % len(MIXED)]
                   for position, view in enumerate(find_moe_blocks(model)) for expert in range(view.num_experts)}
    quantize_model(model, QuantizationSettings(method="rtn", bits=4, group_size=group_size, bit_map=bit_map))
    folder = work / f"{name}-{'mixed' if mixed else 'w4'}-native"
    folder.mkdir()
    save_model(model, tokenizer, folder)
    (folder / "report.json").write_text("{}\n")
    return folder


def our_logits(folder: Path, round_dequantized_to: torch.dtype | None = None) -> torch.Tensor:
    """Our packed model's fp32 logits. ``round_dequantized_to``: round each dequantised weight to that dtype first,
    as transformers' compressed-tensors path does (it dequantises in the scales' dtype), to show that this rounding
    is the whole difference."""
    from transformers import AutoModelForCausalLM

    from moecompress.quantization import packing

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    original = packing.PackedLinearWeight.dequantize
    if round_dequantized_to is not None:
        packing.PackedLinearWeight.dequantize = lambda self, dtype=None: original(self, round_dequantized_to).to(
            dtype or self.scales.dtype)
    try:
        with torch.no_grad():
            return model(INPUT_IDS).logits
    finally:
        packing.PackedLinearWeight.dequantize = original


def plain_transformers(folders: list[Path], work: Path) -> dict:
    out = work / "plain.pt"
    subprocess.run([sys.executable, "-c", _PLAIN, str(out), json.dumps(INPUT_IDS.tolist()), *map(str, folders)],
                   check=True, capture_output=True, text=True)
    results = torch.load(out)
    assert not results.pop("moecompress_imported")
    return results


EXPORTS = {"4 bit": (False, {}), "mixed per layer, --for vllm": (True, {"consumer": "vllm"}),
           "mixed per layer, --widen-to-model-max": (True, {"widen_to_model_max": True})}


def read_back(folder: Path) -> torch.Tensor:
    """The export read by moecompress itself (``load_model``: every module decompressed with its own group's scheme,
    fp32): fp32 logits."""
    from moecompress.checkpoint import load_model

    model, _ = load_model(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(INPUT_IDS).logits


def run_case(work: Path, name: str, group_size: int, allocation: str, natives: dict) -> dict:
    from moecompress.export import export_folder
    from moecompress.export.compressed_tensors import decompression_difference
    from moecompress.export.output import folder_bytes

    mixed, options = EXPORTS[allocation]
    if (name, mixed) not in natives:
        natives[name, mixed] = native(work, name, group_size, mixed)
    source = natives[name, mixed]
    tag = "-".join(f"{key}" for key in options) or "default"
    ct, dequantized = source.with_name(f"{source.name}-ct-{tag}"), source.with_name(f"{source.name}-hf-{tag}")
    report = export_folder(source, ct, "compressed-tensors", **options)
    export_folder(source, dequantized, "hf", dequantize=True)
    decompression = decompression_difference(source, ct)
    plain = plain_transformers([ct, dequantized], work)
    row = {
        "model": name, "allocation": allocation, "group_size": group_size, "load": sorted(report["load"]),
        "read_back_vs_ours_max_logit_diff": float((read_back(ct) - our_logits(source)).abs().max()),
        "native_bytes": folder_bytes(source), "ct_bytes": report["bytes_on_disk"],
        "hf_dequantized_bytes": folder_bytes(dequantized),
        "expert_bits_per_parameter": report["expert_bits_per_parameter"],
        "decompression_max_abs_diff": decompression["max_abs_diff"], "modules": decompression["modules"],
    }
    loaded, reference = plain[str(ct)], plain[str(dequantized)]
    if isinstance(loaded, str):
        row["transformers_error"] = loaded
    else:
        row["ct_vs_dequantized_max_logit_diff"] = float((loaded - reference).abs().max())
        row["ct_vs_ours_max_logit_diff"] = float((loaded - our_logits(source)).abs().max())
        row["ct_vs_ours_bf16_rounded_max_logit_diff"] = float((loaded - our_logits(source, torch.bfloat16)).abs().max())
        row["max_abs_logit"] = float(loaded.abs().max())
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder, removed)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    import moecompress  # noqa: F401  (registers the native format)

    set_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="export-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        natives: dict = {}
        for name, group_size in MODELS.items():
            for allocation in EXPORTS:
                rows.append(run_case(work, name, group_size, allocation, natives))
                print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print("| model | export | native MiB | CT MiB | hf-dequantized MiB | expert bits/param | library decompression "
          "max diff | CT vs deq (plain transformers) | CT vs ours max logit diff | same, ours rounded to bf16 | "
          "read back by moecompress vs ours |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        mib = lambda key: f"{row[key] / 2**20:.2f}"  # noqa: E731
        if "transformers_error" in row:
            logits = f"transformers refuses ({row['transformers_error'][:60]}...)", "-", "-"
        else:
            logits = (f"{row['ct_vs_dequantized_max_logit_diff']:.3g}",
                      f"{row['ct_vs_ours_max_logit_diff']:.3g} (of max {row['max_abs_logit']:.1f})",
                      f"{row['ct_vs_ours_bf16_rounded_max_logit_diff']:.3g}")
        print(f"| {row['model']} | {row['allocation']} | {mib('native_bytes')} | {mib('ct_bytes')} | "
              f"{mib('hf_dequantized_bytes')} | {row['expert_bits_per_parameter']:.2f} | "
              f"{row['decompression_max_abs_diff']:.3g} ({row['modules']} modules) | {logits[0]} | {logits[1]} | {logits[2]} | "
              f"{row['read_back_vs_ours_max_logit_diff']:.3g} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared by the tests/test_export_*.py files: native folders from the test bed, and loading an export in a
subprocess that never imports moecompress (plain transformers, as a user of the exported folder would)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from conftest import testbed_model_path
from safetensors.torch import load_file, save_file

from moecompress.checkpoint import load_model
from moecompress.models import find_moe_blocks, keep_experts
from moecompress.quantization.sequential import QuantizationSettings, quantize_model

# Token ids every logits comparison uses (the test-bed vocabulary has 8192 entries).
INPUT_IDS = (torch.arange(2 * 20).reshape(2, 20) * 37 % 8000 + 5)

_PLAIN_LOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
out, ids, folders = sys.argv[1], torch.tensor(json.loads(sys.argv[2])), sys.argv[3:]
results = {}
for folder in folders:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    # transformers' compressed-tensors path leaves decompressed experts in the scales' dtype: compute in fp32
    for parameter in model.parameters():
        if parameter.is_floating_point():
            parameter.data = parameter.data.float()
    with torch.no_grad():
        results[folder] = model(ids).logits
torch.save({"logits": results, "moecompress_imported": "moecompress" in sys.modules}, out)
"""


def native_folder(tmp: Path, name: str, *, bits=4, group_size=32, symmetric=True, bit_map=None, keep=None,
                  targets=("routed_experts",), quantize=True, scale_search="mse") -> Path:
    """Quantise (RTN) a test-bed model and save it in the native format; ``keep`` prunes first
    (``{layer: [experts]}`` or a count per layer); ``bit_map(layer, expert) -> bits``."""
    torch.set_num_threads(1)
    model, tokenizer = load_model(testbed_model_path(name), dtype=torch.bfloat16)
    if keep is not None:
        views = find_moe_blocks(model)
        keep_experts(model, keep(views) if callable(keep) else keep)
    if quantize:
        mapping = None
        if bit_map is not None:
            mapping = {(view.layer_index, expert): bit_map(view.layer_index, expert)
                       for view in find_moe_blocks(model) for expert in range(view.num_experts)}
        quantize_model(model, QuantizationSettings(method="rtn", bits=bits, group_size=group_size, symmetric=symmetric,
                                                   scale_search=scale_search,
                                                   bit_map=mapping, targets=targets))
    from moecompress.checkpoint import save_model

    folder = tmp / f"native-{name}"
    folder.mkdir()
    save_model(model, tokenizer, folder)
    (folder / "report.json").write_text("{}\n")  # as `moecompress compress` leaves it (the export's provenance check)
    return folder


def plain_transformers_logits(folders: list[Path], tmp: Path) -> list[torch.Tensor]:
    """Load each folder with plain ``AutoModelForCausalLM.from_pretrained`` in one fresh Python that never imports
    moecompress (checked); returns their fp32 logits on :data:`INPUT_IDS`."""
    out = tmp / "plain-logits.pt"
    result = subprocess.run([sys.executable, "-c", _PLAIN_LOAD, str(out), json.dumps(INPUT_IDS.tolist()),
                             *map(str, folders)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(out)
    assert not loaded["moecompress_imported"]
    return [loaded["logits"][str(folder)] for folder in folders]


def native_logits(folder: Path) -> torch.Tensor:
    """Our packed model's fp32 logits (the native loader: from_pretrained after import moecompress)."""
    from transformers import AutoModelForCausalLM

    import moecompress  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(INPUT_IDS).logits


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


_LLMC_RENAMES = {".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj."}


def llmcompressor_layout(exported: Path, out: Path, ignore: list[str]) -> Path:
    """Our compressed-tensors export of a Mixtral rewritten the way llm-compressor 0.14 writes one (its
    ``oneshot`` + ``save_pretrained(save_compressed=True)`` on a Mixtral, see the README): one group targeting the
    class ``Linear``, ``ignore`` by module name, and the experts unfused by its MoE calibration modules under
    ``block_sparse_moe.experts.{j}.gate_proj / up_proj / down_proj`` (not Mixtral's ``w1 / w3 / w2``)."""
    out.mkdir()
    for path in exported.iterdir():
        if path.suffix == ".safetensors":
            tensors = load_file(path)
            renamed = {}
            for key, tensor in tensors.items():
                for old, new in _LLMC_RENAMES.items():
                    if ".experts." in key:
                        key = key.replace(old, new)
                renamed[key] = tensor
            save_file(renamed, out / path.name, metadata={"format": "pt"})
        elif path.name not in ("config.json", "README.md", "export_report.json"):
            shutil.copy(path, out / path.name)
    config = json.loads((exported / "config.json").read_text())
    [group] = config["quantization_config"]["config_groups"].values()
    weights = {"actorder": None, "block_structure": None, "dynamic": False, "observer": "memoryless_minmax",
               "observer_kwargs": {}, "scale_dtype": None, "zp_dtype": None, **group["weights"]}
    config["quantization_config"] = {
        "config_groups": {"group_0": {"format": "pack-quantized", "input_activations": None,
                                      "output_activations": None, "targets": ["Linear"], "weights": weights}},
        "format": "pack-quantized", "global_compression_ratio": None, "ignore": ignore, "kv_cache_scheme": None,
        "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
        "transform_config": {}, "version": "0.19.0"}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out

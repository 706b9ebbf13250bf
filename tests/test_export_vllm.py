"""The compressed-tensors version vLLM pins (0.17 for vLLM 0.32) and vLLM's own config parser and scheme matching
read our exports: every MoE layer's experts get their layer's scheme, every unquantized linear none.

Runs in the vLLM venv (``$VLLM_VENV``, else ``/work/venvs/vllm`` or ``.venvs/vllm``: ``scripts/check_vllm.sh``
builds one), in a process that never imports moecompress; skipped, with the reason, when there is none.
``scripts/check_vllm.sh`` goes further (the model build, the weight loader, generation where a kernel exists).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from export_helpers import native_folder

from moecompress.export import export_folder

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = [os.environ.get("VLLM_VENV"), "/work/venvs/vllm", str(REPO / ".venvs" / "vllm")]
VLLM_PYTHON = next((Path(venv) / "bin" / "python" for venv in CANDIDATES
                    if venv and (Path(venv) / "bin" / "python").is_file()), None)

_PARSE = r"""
import copy, json, sys
import compressed_tensors, torch, vllm
from compressed_tensors.quantization import QuantizationConfig
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
results = {"compressed_tensors": compressed_tensors.__version__, "vllm": vllm.__version__}
for folder, probes in json.loads(sys.argv[1]).items():
    config = json.load(open(f"{folder}/config.json"))["quantization_config"]
    QuantizationConfig.model_validate(copy.deepcopy(config))  # the pinned library's own validation
    parsed = CompressedTensorsConfig.from_config(copy.deepcopy(config))  # vLLM's parser
    found = {}
    for name in probes:
        scheme = parsed.get_scheme_dict(torch.nn.Module(), name)  # what get_quant_method / get_moe_method match
        found[name] = None if scheme is None else [scheme["weights"].num_bits, scheme["weights"].group_size,
                                                   scheme["weights"].symmetric, scheme["format"]]
    results[folder] = found
results["moecompress_imported"] = "moecompress" in sys.modules
print(json.dumps(results))
"""


def _probes(folder: Path) -> dict[str, list | None]:
    """Module names vLLM asks about (``{MoE layer}.0.{projection}`` for experts, every ignored linear) and the
    scheme each must get: ``[bits, group size, symmetric, format]`` or None (unquantized)."""
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    expected = {}
    for group in config["config_groups"].values():
        weights = group["weights"]
        scheme = [weights["num_bits"], weights["group_size"], weights["symmetric"], "pack-quantized"]
        for target in group["targets"]:
            if "experts\\.\\d+" in target:
                for layer in target.split("layers\\.(?:")[1].split(")")[0].split("|"):
                    for projection in target.rsplit("(?:", 1)[1].rstrip(")$").split("|"):
                        tail = "block_sparse_moe" if "block_sparse_moe" in target else "mlp"
                        expected[f"model.layers.{layer}.{tail}.experts.0.{projection}"] = scheme
            else:  # a quantized linear: re:.*layers\.1\.mlp\.shared_experts\.gate_proj$
                expected["model." + target[3:].lstrip(".*").rstrip("$").replace("\\.", ".")] = scheme
    for name in config["ignore"]:
        expected[name] = None
    return expected


@pytest.mark.skipif(VLLM_PYTHON is None, reason="no vLLM venv ($VLLM_VENV, /work/venvs/vllm or .venvs/vllm); "
                                                "scripts/check_vllm.sh creates one")
def test_vllm_and_its_compressed_tensors_parse_and_match_our_exports(tmp_path):
    exports = {}
    for name, options, export in (
        ("moe-ref-mx", dict(group_size=32, bit_map=lambda layer, expert: (2, 3, 4)[layer % 3]), {"consumer": "vllm"}),
        ("moe-ref-mx", dict(bits=4, group_size=32, symmetric=False), {"consumer": "vllm"}),
        ("moe-ref-ds", dict(bits=4, group_size=32, targets=("routed_experts", "shared_experts", "attention")), {}),
        ("moe-ref-q3", dict(bits=3, group_size=16), {"widen_to_model_max": True}),
    ):
        folder = tmp_path / f"native{len(exports)}"
        folder.mkdir()
        native = native_folder(folder, name, scale_search="minmax", **options)
        out = tmp_path / f"ct{len(exports)}"
        export_folder(native, out, "compressed-tensors", **export)
        exports[str(out)] = _probes(out)
    probes = {folder: list(expected) for folder, expected in exports.items()}
    run = subprocess.run([str(VLLM_PYTHON), "-c", _PARSE, json.dumps(probes)], capture_output=True, text=True,
                         timeout=900, env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert not results["moecompress_imported"]
    for folder, expected in exports.items():
        assert any(scheme for scheme in expected.values()) and any(s is None for s in expected.values())
        assert results[folder] == expected, (results["compressed_tensors"], results["vllm"], folder)

"""compressed-tensors folders as input: ``moecompress eval`` of our export and of llm-compressor's layout scores
exactly like the same weights loaded natively (deterministic, CPU).

moe-ref-mx, RTN 4-bit group 32 on the routed experts and the attention (what llm-compressor's W4A16 ``Linear``
scheme quantizes), saved natively; then

* ``ours``: ``moecompress export --format compressed-tensors`` of it;
* ``llm-compressor layout``: the same tensors laid out as llm-compressor 0.14 writes a Mixtral (one group targeting
  ``Linear``, ``ignore`` by name, experts under ``block_sparse_moe.experts.{j}.gate_proj / up_proj / down_proj``;
  ``tests/export_helpers.llmcompressor_layout``);
* ``per-layer 2/3/4-bit, --for vllm``: another native folder (widths 2, 3, 4 by layer) and its vLLM-only export,
  which plain transformers refuses and moecompress reads per layer;
* with ``--llmcompressor PYTHON`` (a venv with llmcompressor), a folder llm-compressor itself wrote
  (``oneshot`` with a W4A16 group-32 ``QuantizationModifier``; its own RTN weights, so only its scores are shown).

Each folder is scored by ``moecompress eval`` (the CLI's code path) on ``--tasks`` with ``--limit`` items.

    python benchmarks/ct_input.py [--tasks tb_arith,tb_code_next,tb_ppl_austen] [--limit 100] [--llmcompressor PY]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import add_repo_to_path, set_threads, testbed_model

add_repo_to_path()
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

_LLMCOMPRESSOR = r"""
import sys, torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM, AutoTokenizer
source, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, type="int", symmetric=True,
                                                                         strategy="group", group_size=32))
oneshot(model=model, recipe=QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head", "re:.*gate$"]))
model.save_pretrained(out, save_compressed=True)
AutoTokenizer.from_pretrained(source).save_pretrained(out)
"""


def build(work: Path, llmcompressor: str | None) -> dict[str, Path]:
    from export_helpers import llmcompressor_layout, native_folder

    from moecompress.export import export_folder

    folders = {}
    (work / "w4").mkdir()
    native = native_folder(work / "w4", "moe-ref-mx", bits=4, group_size=32, scale_search="minmax",
                           targets=("routed_experts", "attention"))
    folders["native (4-bit experts + attention)"] = native
    export_folder(native, work / "ct", "compressed-tensors")
    folders["ours: compressed-tensors export"] = work / "ct"
    gates = [f"model.layers.{layer}.block_sparse_moe.gate" for layer in range(6)]
    folders["llm-compressor layout, same weights"] = llmcompressor_layout(work / "ct", work / "llmc", gates + ["lm_head"])
    (work / "mixed").mkdir()
    mixed = native_folder(work / "mixed", "moe-ref-mx", group_size=32, scale_search="minmax",
                          bit_map=lambda layer, expert: (2, 3, 4)[layer % 3])
    folders["native (2/3/4-bit per layer)"] = mixed
    export_folder(mixed, work / "ct-mixed", "compressed-tensors", consumer="vllm")
    folders["ours: per-layer export, --for vllm"] = work / "ct-mixed"
    if llmcompressor:
        subprocess.run([llmcompressor, "-c", _LLMCOMPRESSOR, str(testbed_model("moe-ref-mx")), str(work / "real")],
                       check=True, capture_output=True, text=True)
        folders["llm-compressor 0.14 oneshot W4A16 (its own RTN)"] = work / "real"
    return folders


def scores(folder: Path, tasks: str, limit: int) -> dict:
    """``moecompress eval FOLDER --tasks ... --limit ... --json`` in a fresh process (this checkout's package)."""
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # tiny models: one thread is fastest
    run = subprocess.run([sys.executable, "-m", "moecompress.cli", "eval", str(folder), "--tasks", tasks, "--limit",
                          str(limit), "--json"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="tb_arith,tb_code_next,tb_ppl_austen")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--llmcompressor", default=None, help="python of a venv with llmcompressor installed")
    args = parser.parse_args()
    set_threads(1)
    with tempfile.TemporaryDirectory(prefix="ct-input-") as folder:
        folders = build(Path(folder), args.llmcompressor)
        rows = {name: scores(path, args.tasks, args.limit) for name, path in folders.items()}
    tasks = args.tasks.split(",")
    metric = {task: ("bits_per_byte" if "ppl" in task else "acc") for task in tasks}
    print(f"moecompress eval FOLDER --tasks {args.tasks} --limit {args.limit}")
    print()
    print("| folder | " + " | ".join(f"{task} {metric[task]}" for task in tasks) + " |")
    print("|---|" + "---|" * len(tasks))
    for name, result in rows.items():
        print(f"| {name} | " + " | ".join(f"{result[task][metric[task]]:.6f}" for task in tasks) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

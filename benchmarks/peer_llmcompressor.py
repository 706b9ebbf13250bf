"""The peer: llm-compressor 0.14's GPTQ and REAP on a test-bed model, calibrated on moecompress's exact calibration
tokens, written as a plain Hugging Face folder our evaluator scores (benchmarks/mcmoe.py ``folder:``,
benchmarks/pruning.py ``--folder``).

Runs in llm-compressor's own venv (it pins transformers 5.17; ``/work/venvs/llmc`` here), never in the project's:

    .venv/bin/python scripts/dump_calibration.py --model ../shared/testbed/models/moe-ref-mx \
        --files ../shared/testbed/calib --num-samples 32 --seq-len 256 --out runs/peer/calib_mx.safetensors
    /work/venvs/llmc/bin/python benchmarks/peer_llmcompressor.py gptq --model ../shared/testbed/models/moe-ref-mx \
        --calibration runs/peer/calib_mx.safetensors --bits 3 --group-size 128 --out runs/peer/mx_gptq_w3
    /work/venvs/llmc/bin/python benchmarks/peer_llmcompressor.py reap --model ../shared/testbed/models/moe-ref-q3 \
        --calibration runs/peer/calib_q3_pycode.safetensors --keep 8 --out runs/peer/q3_reap_8

``gptq``: ``GPTQModifier`` with the maintainers' defaults (static act-order, damping 0.01, block 128, min/max
observer, every expert calibrated on every token: ``moe_calibrate_all_experts``), weights int ``--bits``, symmetric,
groups of ``--group-size``. llm-compressor needs every group whole (its observer reshapes the columns into groups),
and the test-bed experts' down_proj inputs are not multiples of 128 (mx 288, q3 80, ds 64 columns); moecompress
then ends a row with a shorter group. So down_proj gets the same NUMBER of groups per row as moecompress's, of equal
width: ``width / ceil(width / group_size)`` (mx 3 groups of 96 where moecompress has 128 + 128 + 32; q3 and ds one
group per row, as moecompress). Only the routed experts' linears are quantised (attention, routers, shared experts, embeddings and
lm_head stay as they are, as in moecompress's recipes, so that both are compared on the same parameters). The model
loads in its checkpoint dtype (bf16) as the maintainers' examples do. ``OUT/compressed`` is llm-compressor's
compressed-tensors save; ``OUT/plain`` the same weights dequantised in float32 (exact: ``code * scale``) with the
quantisation config removed, plus ``stored_expert_bytes.json`` (the routed experts' bytes in the compressed folder).

``reap``: ``REAPPruningModifier`` (sparsity ``1 - keep / experts``), sequential pipeline; ``OUT/plain`` is its save.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def calibration_dataset(path: Path):
    """A ``datasets.Dataset`` of the token ids in ``path`` (``input_ids``, attention mask of ones)."""
    import safetensors.torch
    from datasets import Dataset

    ids = safetensors.torch.load_file(str(path))["input_ids"]
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * ids.shape[1]] * ids.shape[0]}), ids


def load(model_path: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcompressor.modeling.moe.linearize import linearize_moe

    # experts as per-expert linears, as llm-compressor calibrates them. Its load-time path (load_quantizable_moe)
    # imports every transformers model module for Qwen3-MoE, and one of them needs torchvision, which its venv
    # lacks; converting after loading is its other documented path (same weights, slower load).
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    linearize_moe(model)
    return model, AutoTokenizer.from_pretrained(model_path)


def expert_bytes(folder: Path) -> int:
    """Bytes of the routed experts' tensors (keys with an ``.experts.`` part) in ``folder``'s safetensors files."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if ".experts." in key:
                    tensor = handle.get_tensor(key)
                    total += tensor.numel() * tensor.element_size()
    return total


# llm-compressor saves linearised Mixtral experts as gate/up/down_proj; the checkpoint (and transformers' loader)
# names them w1/w3/w2
MIXTRAL_EXPERT_NAMES = {".gate_proj.": ".w1.", ".up_proj.": ".w3.", ".down_proj.": ".w2."}


def source_key(key: str, source_keys: set[str]) -> str:
    """``key`` under the source checkpoint's naming (the same, or the Mixtral expert names)."""
    if key in source_keys or ".block_sparse_moe.experts." not in key:
        return key
    for new, old in MIXTRAL_EXPERT_NAMES.items():
        key = key.replace(new, old)
    return key


def dequantise_folder(compressed: Path, plain: Path, source: Path) -> None:
    """Write ``compressed`` (compressed-tensors pack-quantized) as a plain float32 folder with the ``source``
    checkpoint's key names: every packed linear ``W = code * scale`` per group (symmetric, no g_idx: static
    act-order keeps groups contiguous), every other tensor as float32, ``quantization_config`` removed."""
    import safetensors.torch
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open

    source_keys = set()
    for path in Path(source).glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            source_keys.update(handle.keys())

    config = json.loads((compressed / "config.json").read_text())
    quantization = config.pop("quantization_config")
    groups = [group["weights"] for group in quantization["config_groups"].values()]
    if any(not group["symmetric"] or group.get("strategy") != "group" for group in groups) or \
            len({group["num_bits"] for group in groups}) != 1:
        raise SystemExit(f"only symmetric group-wise weight schemes of one width are handled, got {groups}")
    bits = groups[0]["num_bits"]
    plain.mkdir(parents=True, exist_ok=True)
    for path in sorted(compressed.glob("*.safetensors")):
        tensors = safetensors.torch.load_file(str(path))
        output = {}
        for key, tensor in tensors.items():
            if key.endswith((".weight_scale", ".weight_shape")):
                continue
            if key.endswith(".weight_packed"):
                prefix = key[: -len(".weight_packed")]
                shape = torch.Size(tensors[f"{prefix}.weight_shape"].tolist())
                codes = unpack_from_int32(tensor, bits, shape).float()
                scales = tensors[f"{prefix}.weight_scale"].float()
                scales = scales.repeat_interleave(shape[1] // scales.shape[1], dim=-1)  # whole groups (run_gptq)
                output[f"{prefix}.weight"] = (codes * scales[:, : shape[1]]).contiguous()
            else:
                output[key] = tensor.float() if tensor.is_floating_point() else tensor
        output = {source_key(key, source_keys): tensor for key, tensor in output.items()}
        unknown = sorted(set(output) - source_keys)
        if unknown:
            raise SystemExit(f"{len(unknown)} dequantised tensors have no counterpart in {source}: {unknown[:3]}")
        safetensors.torch.save_file(output, str(plain / path.name), metadata={"format": "pt"})
    if (compressed / "model.safetensors.index.json").is_file():
        index = json.loads((compressed / "model.safetensors.index.json").read_text())
        index["weight_map"] = {source_key(key.replace(".weight_packed", ".weight"), source_keys): file
                               for key, file in index["weight_map"].items()
                               if not key.endswith((".weight_scale", ".weight_shape"))}
        (plain / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config["dtype"] = "float32"
    (plain / "config.json").write_text(json.dumps(config, indent=1))
    for extra in compressed.iterdir():
        if extra.suffix != ".safetensors" and extra.name not in ("config.json", "model.safetensors.index.json",
                                                                   "recipe.yaml") and extra.is_file():
            shutil.copy(extra, plain / extra.name)
    (plain / "stored_expert_bytes.json").write_text(json.dumps({"stored_expert_bytes": expert_bytes(compressed),
                                                                "source": str(compressed)}))


def down_group_size(width: int, group_size: int) -> int:
    """Equal groups of ``width`` columns, as many per row as moecompress's ``group_size`` groups (module docstring)."""
    groups = -(-width // group_size)
    if width % groups:
        raise SystemExit(f"down_proj width {width} does not split into {groups} equal groups")
    return width // groups


def run_gptq(args) -> None:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    dataset, ids = calibration_dataset(args.calibration)
    model, tokenizer = load(args.model)
    config = model.config
    width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size

    def scheme(targets, group_size):
        return {"targets": targets, "weights": {"num_bits": args.bits, "type": "int", "symmetric": True,
                                                "strategy": "group", "group_size": group_size}}

    recipe = GPTQModifier(
        config_groups={
            "gate_up": scheme(["re:.*mlp\\.experts\\.[0-9]+\\.(gate|up)_proj$",
                               "re:.*block_sparse_moe\\.experts\\.[0-9]+\\.(w1|w3)$"], args.group_size),
            "down": scheme(["re:.*mlp\\.experts\\.[0-9]+\\.down_proj$",
                            "re:.*block_sparse_moe\\.experts\\.[0-9]+\\.w2$"],
                           down_group_size(width, args.group_size))},
        ignore=["lm_head"])
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], pipeline="sequential")
    compressed = args.out / "compressed"
    model.save_pretrained(compressed, save_compressed=True)
    tokenizer.save_pretrained(compressed)
    dequantise_folder(compressed, args.out / "plain", Path(args.model))


def run_reap(args) -> None:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import REAPPruningModifier

    dataset, ids = calibration_dataset(args.calibration)
    model, tokenizer = load(args.model)
    experts = model.config.num_experts if hasattr(model.config, "num_experts") else model.config.num_local_experts
    recipe = REAPPruningModifier(sparsity=1 - args.keep / experts, report_path=str(args.out / "kept.json"))
    args.out.mkdir(parents=True, exist_ok=True)
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], pipeline="sequential")
    model.save_pretrained(args.out / "plain")
    tokenizer.save_pretrained(args.out / "plain")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method", choices=["gptq", "reap"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calibration", type=Path, required=True, help="token ids from scripts/dump_calibration.py")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--keep", type=int, default=None, help="reap: experts kept per layer")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    run_gptq(args) if args.method == "gptq" else run_reap(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The peer's side of ``benchmarks/peer_gptq.py``: llm-compressor's GPTQ on one model, run in llm-compressor's own
venv (``/work/venvs/llmc``; it pins another transformers). It never imports moecompress.

    /work/venvs/llmc/bin/python benchmarks/llmcompressor_gptq.py MODEL OUT TOKENS.json --bits 2 --group-size 128

TOKENS.json holds ``{"input_ids": [[...], ...]}``: the calibration sequences moecompress uses (the same tokens, so
both sides calibrate on the same data). Experts only (routers, attention, embeddings, ``lm_head`` kept), symmetric
int groups, GPTQ with llm-compressor's defaults otherwise; a projection whose input width is not a multiple of the
group size (Mixtral's 288-column ``down_proj`` at group 128, which llm-compressor refuses) gets the largest group
size below it that divides its width and is a multiple of 16. Prints one JSON line: the seconds of each phase.
"""

from __future__ import annotations

import argparse
import json
import time

STARTED = time.perf_counter()

import torch  # noqa: E402


def group_size_for(columns: int, wanted: int) -> int:
    """``wanted`` when it divides ``columns``, else the largest multiple of 16 below it that does."""
    if columns % wanted == 0:
        return wanted
    return next(size for size in range(wanted - 16, 0, -16) if columns % size == 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("tokens")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    imported = time.perf_counter()
    input_ids = json.loads(open(args.tokens).read())["input_ids"]
    dataset = Dataset.from_dict({"input_ids": input_ids, "attention_mask": [[1] * len(row) for row in input_ids]})
    config = AutoConfig.from_pretrained(args.model)
    hidden = config.hidden_size
    intermediate = getattr(config, "moe_intermediate_size", None) or config.intermediate_size

    def scheme(targets: list[str], columns: int) -> QuantizationScheme:
        weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=True, strategy="group",
                                   group_size=group_size_for(columns, args.group_size))
        return QuantizationScheme(targets=targets, weights=weights)

    groups = {"gate_up": scheme(["re:.*experts.*(gate|up|w1|w3).*"], hidden),
              "down": scheme(["re:.*experts.*(down|w2).*"], intermediate)}
    recipe = GPTQModifier(config_groups=groups, ignore=["lm_head", "re:.*self_attn.*", "re:.*(gate|router)$"])
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    loaded = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=len(input_ids),
            max_seq_length=len(input_ids[0]), shuffle_calibration_samples=False)
    calibrated = time.perf_counter()
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    saved = time.perf_counter()
    print(json.dumps({"import": imported - STARTED, "load": loaded - imported, "oneshot": calibrated - loaded,
                      "save": saved - calibrated, "in_process": saved - STARTED,
                      "group_sizes": {name: group.weights.group_size for name, group in groups.items()}}))


if __name__ == "__main__":
    main()

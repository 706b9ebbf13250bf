"""PreMoe TAER on the test bed: does a held-out prompt pick its own domain's pattern, and what does a build read?

For every calibration domain of ``../shared/testbed/calib`` the documents are split (even positions build the store,
odd positions are held out); the store has one pattern per domain. Held-out prompts are consecutive windows of
``L`` tokens of the held-out documents (evenly spread over the domain's text); a prompt counts as right when the
nearest pattern is its own domain's. Then the reduced model of each domain's pattern is built from a cold
checkpoint for each kept-expert budget, and the bytes read (query prefix + build) are compared with the checkpoint.

    .venv/bin/python benchmarks/retrieval.py                      # all three test-bed models, markdown tables
    .venv/bin/python benchmarks/retrieval.py --models moe-ref-q3 --prompt-lengths 16,64 --json-out /tmp/r.json

Quality numbers only (fractions and bytes are deterministic); no timing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from _common import TESTBED_CALIB, add_repo_to_path, add_threads_argument, set_threads, testbed_model

add_repo_to_path()

from moecompress.calibration.data import read_documents, separator_token_id  # noqa: E402
from moecompress.checkpoint.partial import AssemblySources, CountingCheckpoint  # noqa: E402
from moecompress.pruning.retrieval import PromptScorer, RetrievedModel, TcessOptions, build_pattern_store  # noqa: E402

BUDGETS = {"moe-ref-q3": [24, 16, 8], "moe-ref-mx": [6, 4], "moe-ref-ds": [24, 16, 8]}


def split_domains(calib_dir: Path, out_dir: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per domain: store files (even documents, written to ``out_dir``) and held-out texts (odd documents)."""
    store_files, held_out = {}, {}
    for path in sorted(calib_dir.glob("*.jsonl")):
        documents = read_documents([path])
        domain = documents[0].domain
        store_part = [doc.text for doc in documents[0::2]]
        held_out[domain] = [doc.text for doc in documents[1::2]]
        target = out_dir / f"{domain}.jsonl"
        target.write_text("".join(json.dumps({"text": text, "domain": domain}) + "\n" for text in store_part))
        store_files[domain] = [str(target)]
    return store_files, held_out


def held_out_prompts(texts: list[str], tokenizer, length: int, count: int) -> list[list[int]]:
    """``count`` windows of ``length`` tokens spread evenly over the held-out token stream."""
    separator = separator_token_id(tokenizer)
    stream: list[int] = []
    for text in texts:
        stream += ([separator] if stream else []) + tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = len(stream) // length
    if windows == 0:
        return []
    step = max(windows // count, 1)
    return [stream[i * length:(i + 1) * length] for i in range(0, windows, step)][:count]


def non_expert_bytes(checkpoint: CountingCheckpoint) -> int:
    """Bytes of every tensor that is not a routed expert's (from the headers, nothing read)."""
    from moecompress.checkpoint.lazy import per_expert_keys

    routed = set()
    for prefix, roles in per_expert_keys(checkpoint.files).items():
        routed |= {checkpoint.files[f"{prefix}.{suffix}"][1] for experts in roles.values() for suffix in experts.values()}
    sizes = tensor_sizes(checkpoint.folder)
    return sum(size for key, size in sizes.items() if key not in routed)


def expert_bytes(folder: Path) -> int:
    checkpoint = CountingCheckpoint(folder)
    return checkpoint.total_bytes - non_expert_bytes(checkpoint)


def tensor_sizes(folder: Path) -> dict[str, int]:
    import struct

    sizes = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        sizes.update({key: e["data_offsets"][1] - e["data_offsets"][0] for key, e in header.items() if key != "__metadata__"})
    return sizes


def evaluate_model(name: str, args) -> dict:
    from transformers import AutoTokenizer

    folder = testbed_model(name)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tcess = TcessOptions.preset(args.preset)
    with tempfile.TemporaryDirectory() as temp:
        store_files, held_out = split_domains(TESTBED_CALIB, Path(temp))
        store = build_pattern_store(folder, store_files, num_samples=args.num_samples, seq_len=args.seq_len,
                                    tcess=tcess, dtype=torch.float32)
    first, second = store.moe_layers[0], store.moe_layers[1]
    variants = {f"[{first}]": [first], f"[{first},{second}]": [first, second]}
    scorer = PromptScorer.load(AssemblySources(CountingCheckpoint(folder)), tokenizer, [first, second], tcess,
                               dtype=torch.float32)
    accuracy: dict[str, dict[str, dict[str, float]]] = {}
    for length in args.prompt_lengths:
        prompts = {domain: held_out_prompts(texts, tokenizer, length, args.prompts_per_domain)
                   for domain, texts in held_out.items()}
        scores = {domain: [scorer.score(prompt) for prompt in domain_prompts] for domain, domain_prompts in prompts.items()}
        for label, layers in variants.items():
            row = {}
            for domain, domain_scores in scores.items():
                right = [store.nearest({layer: score[layer] for layer in layers})[0] == domain for score in domain_scores]
                row[domain] = sum(right) / max(len(right), 1)
            row["mean"] = sum(row.values()) / len(row)
            accuracy[f"{length} tokens, key layers {label}"] = row
    num_experts = int(next(iter(store.patterns.values())).shape[1])
    bytes_rows = []
    for keep in BUDGETS.get(name, [num_experts // 2]):
        # the CLI's flow: query (prefix up to the key layer's router), then a build sharing the query's tensors;
        # then a swap to every other task in turn (experts already held move over, only missing ones are read)
        builds, swaps, query_bytes = [], [], 0
        for first_task in store.task_names:
            retrieved = RetrievedModel(folder, store, num_experts_to_keep=keep, key_layers=[first],
                                       dtype=torch.float32, check_fingerprint=False)
            retrieved.scorer()
            query_bytes = retrieved.bytes_read
            builds.append(retrieved.use_task(first_task).build_bytes)
            if first_task == store.task_names[0]:
                swaps = [retrieved.use_task(task).build_bytes for task in store.task_names[1:]]
        bytes_rows.append({"keep": keep, "num_experts": num_experts, "query_bytes": query_bytes,
                           "build_bytes": max(builds), "swap_bytes_mean": sum(swaps) / len(swaps),
                           "checkpoint_bytes": retrieved.checkpoint.total_bytes, "expert_bytes": expert_bytes(folder)})
    result = {"model": name, "super_experts": store.super_experts, "accuracy": accuracy, "bytes": bytes_rows,
              "domains": store.task_names}
    if args.quality and name in args.quality.split(","):
        result["quality"] = pattern_quality(folder, store, tokenizer, args)
    return result


# domain pattern -> the held-out multiple-choice task of that domain
QUALITY_TASKS = {"pycode": "tb_code_next", "austen": "tb_austen_next", "kjv": "tb_kjv_next"}


def pattern_quality(folder: Path, store, tokenizer, args) -> dict:
    """acc_mutual_info of the reduced model of each domain's pattern on each domain's task (and of the full model):
    does retrieving the right pattern matter?"""
    from moecompress.checkpoint import load_model
    from moecompress.evals import evaluate_model

    tasks = list(QUALITY_TASKS.values())
    full, _ = load_model(folder, dtype=torch.float32)
    rows = {"full model": evaluate_model(full, tokenizer, tasks, limit=args.quality_limit, batch_size=32)}
    del full
    for domain in QUALITY_TASKS:
        retrieved = RetrievedModel(folder, store, num_experts_to_keep=args.quality_keep, dtype=torch.float32,
                                   check_fingerprint=False)
        retrieved.use_task(domain)
        rows[f"{domain} pattern"] = evaluate_model(retrieved.model, tokenizer, tasks, limit=args.quality_limit,
                                                   batch_size=32)
    return {"keep": args.quality_keep, "limit": args.quality_limit,
            "acc_mutual_info": {row: {task: scores[task]["acc_mutual_info"] for task in tasks} for row, scores in rows.items()}}


def markdown(results: list[dict]) -> str:
    lines = []
    domains = results[0]["domains"]
    lines.append("| model | prompt | " + " | ".join(domains) + " | mean |")
    lines.append("|---|---|" + "---:|" * (len(domains) + 1))
    for result in results:
        for setting, row in result["accuracy"].items():
            lines.append(f"| {result['model']} | {setting} | " + " | ".join(f"{row[d]:.2f}" for d in domains)
                         + f" | **{row['mean']:.2f}** |")
    lines.append("")
    lines.append("| model | experts kept | query reads | build reads | query + build | share of checkpoint | "
                 "routed-expert share read | swap reads (mean) |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for result in results:
        for row in result["bytes"]:
            total = row["query_bytes"] + row["build_bytes"]
            mib = 2 ** 20
            lines.append(f"| {result['model']} | {row['keep']}/{row['num_experts']} | {row['query_bytes'] / mib:.2f} MiB | "
                         f"{row['build_bytes'] / mib:.2f} MiB | {total / mib:.2f} of {row['checkpoint_bytes'] / mib:.2f} MiB | "
                         f"{100 * total / row['checkpoint_bytes']:.1f}% | "
                         f"{(total - row['checkpoint_bytes'] + row['expert_bytes']) / row['expert_bytes']:.1%} | "
                         f"{row['swap_bytes_mean'] / mib:.2f} MiB |")
    for result in results:
        quality = result.get("quality")
        if not quality:
            continue
        tasks = list(next(iter(quality["acc_mutual_info"].values())))
        lines.append("")
        lines.append(f"{result['model']}, {quality['keep']} experts kept per layer, acc_mutual_info on "
                     f"{quality['limit'] or 'all'} items per task:")
        lines.append("")
        lines.append("| model | " + " | ".join(tasks) + " |")
        lines.append("|---|" + "---:|" * len(tasks))
        for row, scores in quality["acc_mutual_info"].items():
            lines.append(f"| {row} | " + " | ".join(f"{scores[task]:.3f}" for task in tasks) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="moe-ref-q3,moe-ref-mx,moe-ref-ds")
    parser.add_argument("--num-samples", type=int, default=64, help="store: calibration sequences per domain")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompt-lengths", default="32,128", help="held-out prompt lengths in tokens")
    parser.add_argument("--prompts-per-domain", type=int, default=20)
    parser.add_argument("--preset", default="recommended", choices=["recommended", "premoe_code"])
    add_threads_argument(parser, 1)
    parser.add_argument("--quality", default="", help="models (comma-separated) whose domain patterns are also scored "
                                                     "on the domains' tasks, e.g. moe-ref-q3")
    parser.add_argument("--quality-keep", type=int, default=8, help="experts kept for --quality (default 8)")
    parser.add_argument("--quality-limit", type=int, default=None, help="items per task for --quality (default all)")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--from-json", default=None, help="only render the tables of a previous --json-out")
    args = parser.parse_args()
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        for result in results:
            for row in result["bytes"]:
                row["expert_bytes"] = expert_bytes(testbed_model(result["model"]))
        print(markdown(results))
        return 0
    args.prompt_lengths = [int(x) for x in args.prompt_lengths.split(",")]
    set_threads(args.threads)
    results = [evaluate_model(name, args) for name in args.models.split(",")]
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

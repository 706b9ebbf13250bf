"""GGUF export measured by llama.cpp itself: logits against the source model, and bits per byte on the bundled
perplexity tasks computed from llama.cpp's logits (llama-cpp-python, in its own Python, through
``scripts/llama_cpp_runner.py``).

    python benchmarks/gguf_quality.py types  --models moe-ref-q3,moe-ref-mx,moe-ref-ds --json-out runs/gguf-types.json
    python benchmarks/gguf_quality.py budget --models moe-ref-q3,moe-ref-mx --avg-bits 3.0,2.5 --json-out runs/gguf-budget.json
    python benchmarks/gguf_quality.py --merge runs/gguf-types.json           # the tables of earlier runs
    python benchmarks/gguf_quality.py --compare runs/gguf-budget.json        # paired differences at equal file size

``types``: one row per (model, GGUF type). Rows from the original checkpoint: every linear weight in that type,
quantized by llama.cpp's reference quantizers (ours, byte for byte); the logits are compared with the original
(transformers, fp32). Rows from a native moecompress folder (RTN, groups of 32, every linear but the embedding): the
``auto`` types (8 and 4 bits symmetric: Q8_0 / Q4_0 with our codes; 4 bits asymmetric: Q4_1; 3 and 2 bits:
re-quantized to Q3_K / Q2_K); the logits are compared with our native model (fp32).

``budget``: at the same non-expert types for every row (``--base``: attention Q4_K, embedding Q6_K), the routed
experts as
  gptq4          GPTQ 4-bit symmetric groups of 32 -> Q4_0 bit for bit (the exact path)
  llama_q4_0     the original's experts in Q4_0 by llama.cpp's quantizer: the same types and bytes as gptq4
  pmq<b>         PMQ (one width per layer, {2, 3, 4}, ``b`` bits on average) + GPTQ, exported with the auto types
                 (2 -> Q2_K and 3 -> Q3_K re-quantized, 4 -> Q4_0 exact)
  direct<b>      the same types per tensor as pmq<b>, quantized from the original by llama.cpp's quantizers: PMQ's
                 allocation without GPTQ, at exactly the same bytes
  hand<b>        a llama.cpp-style table (llama-quantize's Q2_K / Q3_K_M mixes: one K-quant for the experts, ffn_down
                 one step wider in its "use_more_bits" layers, then gate/up one step wider layer by layer) at the
                 smallest tensor bytes >= pmq<b>'s; hand_below<b>: the largest <= pmq<b>'s
Bits per byte: ``-sum ln p / ln 2 / bytes`` over the documents of the eight ``tb_ppl_*`` tasks (each scored after
``<|endoftext|>``, one window), the mean over tasks first; ``--compare`` gives paired differences with a bootstrap
interval over documents (resampled within each task). Needs a Python with llama_cpp: ``$MOECOMPRESS_LLAMA_PYTHON``
(default ``/work/venvs/llama/bin/python``). Work files (native folders, GGUF files) go to ``--work`` and are reused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import (REPO_ROOT, TESTBED_CALIB, add_merge_compare_arguments, add_repo_to_path, add_threads_argument,
                     print_merged_or_compared, sequence_log_likelihood, set_offline, set_threads, testbed_model)

set_offline()
add_repo_to_path()

import numpy as np  # noqa: E402
import torch  # noqa: E402

PPL_TASKS = ("tb_ppl_arithmetic", "tb_ppl_austen", "tb_ppl_kjv", "tb_ppl_manpages", "tb_ppl_pycode", "tb_ppl_pydocs",
             "tb_ppl_shakespeare", "tb_ppl_wordnet")
PROMPT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
          "of a wife.\ndef add(a, b):\n    return a + b\n12 + 30 = 42\n")
RUNNER = REPO_ROOT / "scripts" / "llama_cpp_runner.py"
ALL_LINEARS = ("attention", "shared_expert", "dense_ffn", "routed_experts")
ORIGINAL_TYPES = ("F32", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q4_0", "Q3_K", "Q2_K")
# native folders for the `types` rows: (name, bits, symmetric)
NATIVE_SCHEMES = (("s8", 8, True), ("s4", 4, True), ("a4", 4, False), ("s3", 3, True), ("s2", 2, True))
NEXT_TYPE = {"Q2_K": "Q3_K", "Q3_K": "Q4_K", "Q4_K": "Q5_K", "Q5_K": "Q6_K"}


def llama_python() -> str:
    path = os.environ.get("MOECOMPRESS_LLAMA_PYTHON", "/work/venvs/llama/bin/python")
    if not Path(path).exists():
        raise SystemExit(f"no Python with llama_cpp at {path}; set MOECOMPRESS_LLAMA_PYTHON (pip install "
                         "'moecompress[llama]' builds llama-cpp-python)")
    return path


def run_llama(model: Path, ops: list[dict], threads: int, flash_attn: bool = False) -> tuple[list[dict], Path]:
    """The runner's results for ``ops`` on ``model`` (logits files stay in the returned folder)."""
    folder = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    (folder / "request.json").write_text(json.dumps({"model": str(model), "n_ctx": 2048, "threads": threads,
                                                     "flash_attn": flash_attn, "ops": ops}))
    done = subprocess.run([llama_python(), str(RUNNER), str(folder / "request.json"), str(folder / "out")],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"llama.cpp failed on {model}:\n{done.stderr[-3000:]}")
    return json.loads((folder / "out" / "results.json").read_text())["results"], folder / "out"


# ----- documents and scores -----------------------------------------------------------------------------------------

def load_documents(tokenizer, limit: int | None = None) -> dict[str, list[tuple[list[int], int]]]:
    """``{task: [(token ids with the <|endoftext|> context first, UTF-8 bytes of the text)]}``, the first ``limit``
    documents of each task (all by default)."""
    from moecompress.evals.lm import default_bos_token_id

    data = REPO_ROOT / "moecompress" / "evals" / "tasks" / "data"
    context = default_bos_token_id(tokenizer)
    documents = {}
    for task in PPL_TASKS:
        rows = [json.loads(line) for line in (data / f"{task}.jsonl").read_text().splitlines() if line.strip()][:limit]
        documents[task] = [([context, *tokenizer(row["text"])["input_ids"]], len(row["text"].encode("utf-8")))
                           for row in rows]
    return documents


def prompt_tokens(tokenizer) -> list[int]:
    from moecompress.evals.lm import default_bos_token_id

    return [default_bos_token_id(tokenizer), *tokenizer(PROMPT)["input_ids"]]


def gguf_scores(model: Path, documents: dict, threads: int) -> dict[str, list[float]]:
    """Per document: -sum ln p(token) in nats, from llama.cpp's logits (flash attention: half the time here, and
    logits within 0.012 of the default path's on the test bed's F32 files)."""
    ops = [{"op": "score", "docs": [ids for ids, _ in documents[task]]} for task in PPL_TASKS]
    results, _ = run_llama(model, ops, threads, flash_attn=True)
    return {task: [-doc["log_likelihood"] for doc in result["docs"]] for task, result in zip(PPL_TASKS, results)}


def torch_scores(model, documents: dict) -> dict[str, list[float]]:
    """``{task: [negative log-likelihood in nats per document]}`` of the torch model."""
    return {task: [-sequence_log_likelihood(model, ids) for ids, _ in documents[task]] for task in PPL_TASKS}


def bits_per_byte(nats: dict[str, list[float]], documents: dict) -> dict[str, float]:
    return {task: sum(nats[task]) / math.log(2) / sum(size for _, size in documents[task]) for task in PPL_TASKS}


def logit_difference(gguf_path: Path, model, prompt_ids: list[int], threads: int) -> tuple[float, float]:
    """Max and mean |llama.cpp logit - reference logit| over every position of the prompt."""
    results, folder = run_llama(gguf_path, [{"op": "logits", "tokens": prompt_ids}], threads)
    theirs = np.load(folder / results[0]["file"])
    with torch.no_grad():
        ours = model(torch.tensor([prompt_ids])).logits[0].float().numpy()
    difference = np.abs(theirs - ours)
    return float(difference.max()), float(difference.mean())


# ----- model folders ------------------------------------------------------------------------------------------------

def rtn_native(work: Path, name: str, bits: int, symmetric: bool) -> Path:
    """The test-bed model with every linear but the embedding RTN-quantized (groups of 32), saved natively."""
    from moecompress.checkpoint import load_model, save_model
    from moecompress.quantization.sequential import QuantizationSettings, quantize_model

    folder = work / f"{name}-rtn-{'s' if symmetric else 'a'}{bits}"
    if (folder / "report.json").is_file():
        return folder
    model, tokenizer = load_model(testbed_model(name), dtype=torch.bfloat16)
    targets = ("routed_experts", "attention") + (("shared_experts", "dense_mlp") if name == "moe-ref-ds" else ())
    quantize_model(model, QuantizationSettings(method="rtn", bits=bits, group_size=32, symmetric=symmetric,
                                               targets=targets))
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, tokenizer, folder)
    (folder / "report.json").write_text("{}\n")  # as `compress` leaves it (the export's provenance check)
    return folder


def compressed_native(work: Path, name: str, config: str, avg_bits: float | None) -> Path:
    """``gptq4`` or ``pmq`` (one width per layer from {2, 3, 4}) + GPTQ, groups of 32, symmetric, fp32."""
    from moecompress.pipeline import Pipeline
    from moecompress.quantization.pmq import PMQStage
    from moecompress.quantization.stages import GPTQStage

    folder = work / f"{name}-{config}"
    if (folder / "report.json").is_file():
        return folder
    calibration = {"files": [str(TESTBED_CALIB)], "num_samples": 32, "seq_len": 256, "seed": 0}
    stages = [GPTQStage({"bits": 4, "group_size": 32, "symmetric": True})]
    if avg_bits is not None:
        stages.insert(0, PMQStage({"avg_bits": avg_bits, "granularity": "layer", "candidates": [2, 3, 4],
                                   "group_size": 32, "symmetric": True}))
    Pipeline(stages, calibration=calibration).run(testbed_model(name), folder, dtype="float32")
    return folder


def export(source: Path, out: Path, types: str | None) -> dict:
    from moecompress.export.gguf import export_gguf, report_path

    if out.is_file() and report_path(out).is_file():
        report = json.loads(report_path(out).read_text())
        if report.get("requested_types") == types:
            return report
    report = export_gguf(source, out, types=types)
    report["requested_types"] = types
    report_path(out).write_text(json.dumps(report, indent=1))
    return report


def _types(role_types: dict[str, str]) -> str:
    return ",".join(f"{role}={value}" for role, value in role_types.items())


# ----- rows ---------------------------------------------------------------------------------------------------------

def score_row(args, model_name: str, label: str, gguf_path: Path, report: dict, reference, documents: dict,
              prompt_ids: list[int], **extra) -> dict:
    nats = gguf_scores(gguf_path, documents, args.llama_threads)
    bpb = bits_per_byte(nats, documents)
    max_logit, mean_logit = logit_difference(gguf_path, reference, prompt_ids, args.llama_threads)
    requantized = [row["rel_rmse"] for row in report["tensors"] if row["path"] == "requantized"]
    row = {
        "model": model_name, "config": label, "file_bytes": report["bytes_on_disk"],
        "expert_bits_per_parameter": report["expert_bits_per_parameter"],
        "types": {name: entry["bytes"] for name, entry in report["types"].items()},
        "max_quantization_error": max(requantized) if requantized else 0.0,
        "max_logit_difference": max_logit, "mean_logit_difference": mean_logit,
        "bits_per_byte": bpb, "mean_bits_per_byte": sum(bpb.values()) / len(bpb),
        "nats": nats, "doc_bytes": {task: [size for _, size in documents[task]] for task in PPL_TASKS},
        "documents": sum(len(documents[task]) for task in PPL_TASKS), **extra,
    }
    print(json.dumps({key: value for key, value in row.items() if key not in ("nats", "doc_bytes")}), file=sys.stderr,
          flush=True)
    return row


def reference_row(model_name: str, label: str, model, documents: dict) -> dict:
    nats = torch_scores(model, documents)
    bpb = bits_per_byte(nats, documents)
    return {"model": model_name, "config": label, "bits_per_byte": bpb, "mean_bits_per_byte": sum(bpb.values()) / len(bpb),
            "nats": nats, "doc_bytes": {task: [size for _, size in documents[task]] for task in PPL_TASKS}}


def types_rows(args, model_name: str) -> list[dict]:
    from moecompress.checkpoint import load_model

    work = args.work
    original = testbed_model(model_name)
    model, tokenizer = load_model(original, dtype=torch.float32, experts_implementation="eager")
    documents = load_documents(tokenizer, args.docs)
    prompt_ids = prompt_tokens(tokenizer)
    rows = [reference_row(model_name, "original (transformers fp32)", model, documents)]
    original_bpb = rows[0]["mean_bits_per_byte"]
    for type_name in ORIGINAL_TYPES:
        roles = {role: type_name for role in ALL_LINEARS}
        if type_name == "F32":
            roles.update(embedding="F32", output="F32")
        elif type_name == "BF16":
            roles = {}
        path = work / f"{model_name}-original-{type_name}.gguf"
        report = export(original, path, _types(roles) or None)
        rows.append(score_row(args, model_name, f"original -> {type_name}", path, report, model, documents, prompt_ids,
                              source="original", gguf_type=type_name, source_mean_bits_per_byte=original_bpb))
    for label, bits, symmetric in NATIVE_SCHEMES:
        native = rtn_native(work, model_name, bits, symmetric)
        native_model, _ = load_model(native, dtype=torch.float32, experts_implementation="eager")
        reference = reference_row(model_name, f"native rtn {label} (torch fp32)", native_model, documents)
        path = work / f"{model_name}-rtn-{label}.gguf"
        # the embedding (float in the native folder) in F32: the logits then measure the quantized tensors' path
        report = export(native, path, "embedding=F32,output=F32")
        expert_type = next(row["type"] for row in report["tensors"] if row["name"] == "blk.1.ffn_gate_exps.weight")
        rows.append(score_row(args, model_name, f"native rtn {label} -> auto ({expert_type})", path, report, native_model,
                              documents, prompt_ids, source=f"native rtn {label}", gguf_type=expert_type,
                              source_mean_bits_per_byte=reference["mean_bits_per_byte"]))
    return rows


def more_bits_layers(layers: int) -> list[int]:
    """llama-quantize's ``use_more_bits``: the first and last eighth of the layers and every third in between."""
    eighth = layers // 8
    return [i for i in range(layers) if i < eighth or i >= 7 * layers // 8 or (i - eighth) % 3 == 2]


def hand_tables(layers: int, base: dict[str, str]) -> list[str]:
    """llama.cpp-style expert tables in increasing size. For each K-quant B of the experts: ffn_down one step
    wider in the use_more_bits layers (llama-quantize's Q2_K / Q3_K_M rule), then gate and up one step wider in one
    more layer at a time, the use_more_bits layers first, then from the first layer to the last. (The test-bed's
    ffn_down rows, 80 and 288 wide, fit no K-quant, so there the down rule changes nothing and the gate/up steps
    carry the size.)"""
    more = more_bits_layers(layers)
    order = more + [layer for layer in range(layers) if layer not in more]
    tables = []
    for expert_type in ("Q2_K", "Q3_K", "Q4_K"):
        wider = NEXT_TYPE[expert_type]
        rules = [_types(base), f"routed_experts={expert_type}"] + [f"routed_experts.down@{layer}={wider}"
                                                                   for layer in more]
        tables.append(",".join(rules))
        for layer in order:
            rules += [f"routed_experts.gate@{layer}={wider}", f"routed_experts.up@{layer}={wider}"]
            tables.append(",".join(rules))
    return tables


def per_tensor_types(report: dict, base: dict[str, str]) -> str:
    """A --types table giving each routed-expert tensor the type it has in ``report`` (by layer and projection)."""
    rules = [_types(base)]
    for row in report["tensors"]:
        if row["role"] == "routed_experts":
            layer = int(row["name"].split(".")[1])
            projection = row["name"].split(".")[2].split("_")[1]
            rules.append(f"routed_experts.{projection}@{layer}={row['type']}")
    return ",".join(rules)


def budget_rows(args, model_name: str, earlier: list[dict]) -> list[dict]:
    """The budget rows of ``model_name``. With ``--only``, rows of other configurations found in ``earlier`` (the
    --json-out file) are kept as they are instead of being scored again."""
    from moecompress.checkpoint import load_model
    from moecompress.export.gguf import plan_export

    work = args.work
    original = testbed_model(model_name)
    base = dict(item.split("=") for item in args.base.split(","))
    model, tokenizer = load_model(original, dtype=torch.float32, experts_implementation="eager")
    documents = load_documents(tokenizer, args.docs)
    prompt_ids = prompt_tokens(tokenizer)
    kept = {row["config"]: row for row in earlier if row["model"] == model_name}

    def reused(label: str) -> dict | None:
        return kept.get(label) if args.only and label not in args.only else None

    def reference(label: str, reference_model) -> dict:
        return reused(label) or reference_row(model_name, label, reference_model, documents)

    def gguf_row(label: str, source: Path, types: str, reference_model, source_bpb: float, **extra) -> dict:
        if reused(label):
            return reused(label)
        path = work / f"{model_name}-{label}.gguf"
        return score_row(args, model_name, label, path, export(source, path, types), reference_model, documents,
                         prompt_ids, source_mean_bits_per_byte=source_bpb, **extra)

    rows = [reference("original (transformers fp32)", model)]
    original_bpb = rows[0]["mean_bits_per_byte"]
    gptq4 = compressed_native(work, model_name, "gptq4", None)
    gptq4_model, _ = load_model(gptq4, dtype=torch.float32, experts_implementation="eager")
    rows.append(reference("gptq4 native (torch fp32)", gptq4_model))
    rows.append(gguf_row("gptq4", gptq4, _types(base), gptq4_model, rows[-1]["mean_bits_per_byte"]))
    rows.append(gguf_row("llama_q4_0", original, _types({**base, "routed_experts": "Q4_0"}), model, original_bpb))
    layers = int(json.loads((original / "config.json").read_text())["num_hidden_layers"])
    for avg_bits in args.avg_bits:
        pmq = compressed_native(work, model_name, f"pmq{avg_bits}", avg_bits)
        pmq_model, _ = load_model(pmq, dtype=torch.float32, experts_implementation="eager")
        rows.append(reference(f"pmq{avg_bits} native (torch fp32)", pmq_model))
        pmq_row = gguf_row(f"pmq{avg_bits}", pmq, _types(base), pmq_model, rows[-1]["mean_bits_per_byte"])
        rows.append(pmq_row)
        pmq_report = json.loads((work / f"{model_name}-pmq{avg_bits}.export_report.json").read_text())
        widths = {row["name"]: row["source_bits"] for row in pmq_report["tensors"] if row["role"] == "routed_experts"}
        rows.append(gguf_row(f"direct{avg_bits}", original, per_tensor_types(pmq_report, base), model, original_bpb,
                             pmq_widths=widths))
        # tensor bytes (the files' metadata is the same for all): the hand tables just above and just below
        target = sum(tensor.nbytes for tensor in plan_export(pmq, types=_types(base)))
        sized = [(sum(tensor.nbytes for tensor in plan_export(original, types=table)), table)
                 for table in hand_tables(layers, base)]
        above = min([entry for entry in sized if entry[0] >= target] or [max(sized)])
        below = max([entry for entry in sized if entry[0] <= target] or [min(sized)])
        for label, (size, table) in ((f"hand{avg_bits}", above), (f"hand_below{avg_bits}", below)):
            rows.append(gguf_row(label, original, table, model, original_bpb, hand_table=table,
                                 pmq_tensor_bytes=target, hand_tensor_bytes=size,
                                 hand_candidates=[size for size, _ in sized]))
    return rows


# ----- tables -------------------------------------------------------------------------------------------------------

def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | configuration | file MiB | expert bits/param | max weight error | max / mean abs logit diff "
             "| source bits/byte (torch) | llama.cpp bits/byte |", "|---|---|---:|---:|---:|---|---:|---:|"]
    for row in rows:
        if "file_bytes" not in row:
            lines.append(f"| {row['model']} | {row['config']} | - | - | - | - | {row['mean_bits_per_byte']:.4f} | - |")
            continue
        source = row.get("source_mean_bits_per_byte")
        lines.append(f"| {row['model']} | {row['config']} | {row['file_bytes'] / 2**20:.2f} | "
                     f"{row['expert_bits_per_parameter']:.2f} | {row['max_quantization_error']:.4f} | "
                     f"{row['max_logit_difference']:.3f} / {row['mean_logit_difference']:.4f} | "
                     f"{'-' if source is None else f'{source:.4f}'} | {row['mean_bits_per_byte']:.4f} |")
    return "\n".join(lines)


def paired_bpb_difference(first: dict, second: dict, resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean over tasks of (bits per byte of ``first`` - of ``second``), with a 95% bootstrap interval: documents
    resampled within each task, the same documents for both (each task's ratio is recomputed per resample)."""
    generator = np.random.default_rng(seed)
    observed, draws = [], []
    for task in PPL_TASKS:
        difference = np.asarray(first["nats"][task]) - np.asarray(second["nats"][task])
        sizes = np.asarray(first["doc_bytes"][task], dtype=float)
        observed.append(difference.sum() / math.log(2) / sizes.sum())
        picks = generator.integers(0, len(sizes), (resamples, len(sizes)))
        draws.append(difference[picks].sum(axis=1) / math.log(2) / sizes[picks].sum(axis=1))
    mean_draws = np.mean(draws, axis=0)
    low, high = np.percentile(mean_draws, [2.5, 97.5])
    return float(np.mean(observed)), float(low), float(high)


PAIRS = [("gptq4", "llama_q4_0")] + [(f"{a}{bits}", f"{b}{bits}") for bits in ("3.0", "2.5", "2.75")
                                      for a, b in (("pmq", "hand"), ("pmq", "hand_below"), ("direct", "hand"),
                                                   ("direct", "hand_below"), ("pmq", "direct"))]


def comparison_table(rows: list[dict]) -> str:
    lines = ["| model | pair | file MiB (a / b) | bits/byte difference a - b [95% CI] |", "|---|---|---|---|"]
    by_model: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["config"]] = row
    for model, configs in by_model.items():
        for first, second in PAIRS:
            if first in configs and second in configs:
                mean, low, high = paired_bpb_difference(configs[first], configs[second])
                lines.append(f"| {model} | {first} - {second} | {configs[first]['file_bytes'] / 2**20:.2f} / "
                             f"{configs[second]['file_bytes'] / 2**20:.2f} | {mean:+.4f} [{low:+.4f}, {high:+.4f}] |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=["types", "budget"])
    parser.add_argument("--models", default="moe-ref-q3,moe-ref-mx")
    parser.add_argument("--avg-bits", default="3.0,2.5", type=lambda text: [float(v) for v in text.split(",")])
    parser.add_argument("--base", default="attention=Q4_K,shared_expert=Q4_K,dense_ffn=Q4_K,embedding=Q6_K,output=Q6_K",
                        help="types of everything but the routed experts in the budget rows")
    parser.add_argument("--work", type=Path, default=Path("runs/gguf-work"))
    parser.add_argument("--json-out", type=Path, default=Path("runs/gguf.json"))
    parser.add_argument("--llama-threads", type=int, default=1)
    parser.add_argument("--only", type=lambda text: set(text.split(",")), default=None,
                        help="budget: score only these configurations (e.g. hand_below3.0); the others are taken "
                             "from --json-out where it has them")
    parser.add_argument("--docs", type=int, default=None, help="documents per perplexity task (default: all, 48; "
                        "tb_ppl_kjv has 24)")
    add_merge_compare_arguments(parser)
    add_threads_argument(parser, 1)
    args = parser.parse_args(argv)
    if print_merged_or_compared(args, markdown_table, comparison_table):
        return 0
    if args.what is None:
        parser.error("give `types` or `budget` (or --merge / --compare)")
    set_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(args.json_out.read_text())["rows"] if args.json_out.exists() else []
    for model_name in args.models.split(","):
        new = types_rows(args, model_name) if args.what == "types" else budget_rows(args, model_name, rows)
        keys = {(row["model"], row["config"]) for row in new}
        rows = [row for row in rows if (row["model"], row["config"]) not in keys] + new
        args.json_out.write_text(json.dumps({"rows": rows}))
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Set-up shared by the benchmark scripts: paths, offline mode, ``--threads``, ``--merge`` / ``--compare``.

The scripts run as ``python benchmarks/X.py`` from the repository root, so this folder is ``sys.path[0]`` and
``import _common`` (or ``from _common import ...``) finds this module. Import it before transformers, datasets,
lm_eval or moecompress (torch may come first: it reads neither the offline variables nor ``sys.path`` for them), and
call :func:`set_offline` (scripts that want offline mode) and :func:`add_repo_to_path` (scripts that import
moecompress from this checkout) right after it, before those imports.

A script here must not be named like an installed package: ``benchmarks/`` is first on ``sys.path``, so a
``kernels.py`` here once shadowed the ``kernels`` distribution that transformers imports (hence ``kernel_speed.py``).

Only the standard library is imported here, so importing this module keeps ``--help`` fast and sets nothing up that
the offline variables must precede.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

#: The checkout's root (the folder holding ``moecompress/`` and ``benchmarks/``).
REPO_ROOT = Path(__file__).resolve().parents[1]
#: The test bed: ``$MOECOMPRESS_TESTBED``, default ``../shared/testbed`` beside the checkout.
TESTBED = Path(os.environ.get("MOECOMPRESS_TESTBED", REPO_ROOT.parent / "shared" / "testbed"))
#: The test bed's calibration text (one JSONL file per domain).
TESTBED_CALIB = TESTBED / "calib"
#: Environment variables :func:`set_offline` sets to ``1`` (unless already set).
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def set_offline() -> None:
    """Set the Hugging Face offline variables (:data:`OFFLINE_VARIABLES`) to ``1`` where the environment does not
    set them already. Call it before transformers, datasets or lm_eval is imported: they read them on import."""
    for variable in OFFLINE_VARIABLES:
        os.environ.setdefault(variable, "1")


def add_repo_to_path() -> None:
    """Put :data:`REPO_ROOT` first on ``sys.path``, so that ``import moecompress`` imports this checkout's package."""
    if sys.path[:1] != [str(REPO_ROOT)]:
        sys.path.insert(0, str(REPO_ROOT))


def testbed_model(name: str) -> Path:
    """The folder of the test-bed model ``name`` (``moe-ref-q3``, ``moe-ref-mx``, ``moe-ref-ds``)."""
    return TESTBED / "models" / name


def add_threads_argument(parser: argparse.ArgumentParser, default: int | None, help: str | None = None) -> None:
    """Add ``--threads`` (an int, torch's CPU threads) with ``default``; pass the result to :func:`set_threads`."""
    parser.add_argument("--threads", type=int, default=default, help=help)


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)``; None or 0 leaves torch's own choice. Imports torch."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def add_merge_compare_arguments(parser: argparse.ArgumentParser, compare_help: str | None = None) -> None:
    """Add ``--merge JSON...`` and ``--compare JSON...``: result files (``{"rows": [...]}``, a script's
    ``--json-out``) of earlier runs to print one table of, or the paired differences of; see
    :func:`print_merged_or_compared`."""
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON")
    parser.add_argument("--compare", type=Path, nargs="+", default=None, metavar="JSON", help=compare_help)


def read_rows(paths: list[Path]) -> list[dict]:
    """The rows of result files written as ``{"rows": [...]}``, file by file, in order."""
    return [row for path in paths for row in json.loads(path.read_text())["rows"]]


def print_merged_or_compared(args: argparse.Namespace, table: Callable[[list[dict]], str],
                             comparison: Callable[[list[dict]], str]) -> bool:
    """With ``--merge``, print ``table`` of those files' rows; else with ``--compare``, print ``comparison`` of
    them. Returns whether either was given (the script then stops, having run nothing)."""
    if args.merge:
        print(table(read_rows(args.merge)))
        return True
    if args.compare:
        print(comparison(read_rows(args.compare)))
        return True
    return False


def stdout_to_stderr() -> contextlib.redirect_stdout:
    """A context manager sending stdout to stderr (lm-eval's progress output), so stdout holds only the tables."""
    return contextlib.redirect_stdout(sys.stderr)


#: The quality measurement the quantisation, MC-MoE and pruning benchmarks share: accuracy tasks (mean
#: ``acc_mutual_info``) and rolling-perplexity tasks (mean ``bits_per_byte``).
ACCURACY_TASKS = ("tb_code_next", "tb_kjv_next", "tb_austen_next")
PERPLEXITY_TASKS = ("tb_ppl_pycode", "tb_ppl_kjv", "tb_ppl_austen")
#: Tasks no benchmark compares configurations on: the re-check of a claim made on the ones above.
HELD_OUT_ACCURACY_TASKS = ("tb_manpages_next", "tb_pydocs_next", "tb_shakespeare_next")
HELD_OUT_PERPLEXITY_TASKS = ("tb_ppl_manpages", "tb_ppl_pydocs", "tb_ppl_shakespeare", "tb_ppl_wordnet")


#: Requests per forward in :func:`score_model`: 64 was a quarter faster than lm-eval's 16 on these CPUs, same scores.
EVAL_BATCH_SIZE = 64


def score_model(model, tokenizer, *, limit: int, ppl_limit: int, accuracy_tasks=ACCURACY_TASKS,
                perplexity_tasks=PERPLEXITY_TASKS) -> dict:
    """Score ``model`` with lm-eval: ``{"scores": {task: {metric: value}}, "items": {task: [acc_mutual_info per
    item]}, "documents": {task: [[log-likelihood, bytes] per document]}, "mean_acc_mutual_info",
    "mean_bits_per_byte"}`` (means over the tasks; either list may be empty). Imports lm-eval and moecompress."""
    from moecompress.evals import run_lm_eval, scores_from_results
    from moecompress.evals.paired import document_ratios, item_scores

    scores, items, documents = {}, {}, {}
    with stdout_to_stderr():
        if accuracy_tasks:
            results = run_lm_eval(model, tokenizer, list(accuracy_tasks), limit=limit, log_samples=True,
                                  batch_size=EVAL_BATCH_SIZE)
            scores.update(scores_from_results(results))
            items = item_scores(results, "acc_mutual_info")
        if perplexity_tasks:
            results = run_lm_eval(model, tokenizer, list(perplexity_tasks), limit=ppl_limit, log_samples=True,
                                  batch_size=EVAL_BATCH_SIZE)
            scores.update(scores_from_results(results))
            documents = document_ratios(results)

    def mean(tasks, metric):
        return sum(scores[task][metric] for task in tasks) / len(tasks) if tasks else None

    return {"scores": scores, "items": items, "documents": documents,
            "mean_acc_mutual_info": mean(accuracy_tasks, "acc_mutual_info"),
            "mean_bits_per_byte": mean(perplexity_tasks, "bits_per_byte")}


#: Characters of each calibration domain that :func:`calibration_bits_per_byte` scores, in pieces of
#: ``CALIBRATION_PIECE_CHARS`` (the size of the test bed's perplexity documents).
CALIBRATION_CHARS_PER_DOMAIN = 24_000
CALIBRATION_PIECE_CHARS = 1_500


def calibration_pieces(folder: Path = TESTBED_CALIB, chars_per_domain: int = CALIBRATION_CHARS_PER_DOMAIN,
                       piece_chars: int = CALIBRATION_PIECE_CHARS) -> dict[str, list[str]]:
    """``{domain: [text piece, ...]}``: the first ``chars_per_domain`` characters of each calibration JSONL file
    (its documents in file order), cut into pieces of ``piece_chars`` characters that never span two documents.
    The text configurations are chosen on, so that the evaluation tasks stay held out."""
    pieces: dict[str, list[str]] = {}
    for path in sorted(folder.glob("*.jsonl")):
        pieces[path.stem], budget = [], chars_per_domain
        for line in path.read_text(encoding="utf-8").splitlines():
            text = json.loads(line)["text"] if line.strip() else ""
            for start in range(0, len(text), piece_chars):
                if budget <= 0:
                    break
                piece = text[start:start + min(piece_chars, budget)]
                if piece.strip():
                    pieces[path.stem].append(piece)
                    budget -= len(piece)
            if budget <= 0:
                break
    return pieces


def sequence_log_likelihood(model, ids: list[int]) -> float:
    """``sum over t >= 1 of ln p(ids[t] | ids[:t])`` under ``model`` (natural log, the first id only conditions):
    one document as the rolling-perplexity tasks score it. Imports torch."""
    import torch

    tokens = torch.tensor([ids])
    with torch.no_grad():
        logits = model(tokens).logits[0, :-1].double()
    return float(torch.log_softmax(logits, dim=-1).gather(1, tokens[0, 1:, None]).sum())


def calibration_bits_per_byte(model, tokenizer, pieces: dict[str, list[str]]) -> dict:
    """Bits per byte of ``model`` on each domain's ``pieces`` (each piece scored alone after the BOS token, as the
    rolling-perplexity tasks score a document): ``{"per_domain": {domain: bits/byte}, "mean": mean over domains,
    "documents": {domain: [[log-likelihood, bytes] per piece]}}`` (the last in the form
    ``moecompress.evals.paired.paired_ratio_difference`` pairs). A direct computation, ``-sum ln p(token) / ln 2 /
    UTF-8 bytes``."""
    from moecompress.evals.lm import default_bos_token_id
    from moecompress.evals.paired import bits_per_byte

    bos = default_bos_token_id(tokenizer)
    if bos is None:  # lm-eval conditions an empty context on EOS then
        bos = tokenizer.eos_token_id
    documents = {domain: [[sequence_log_likelihood(model, [bos, *tokenizer(text)["input_ids"]]),
                           len(text.encode("utf-8"))] for text in texts] for domain, texts in pieces.items()}
    per_domain = {domain: bits_per_byte(rows) for domain, rows in documents.items()}
    return {"per_domain": per_domain, "mean": sum(per_domain.values()) / len(per_domain), "documents": documents}


def paired_rows(runs: dict[str, dict], pairs, accuracy_tasks=ACCURACY_TASKS) -> list[tuple[str, str, str, str]]:
    """``(a, b, accuracy difference, bits-per-byte difference)`` as text for each ``(a, b)`` of ``pairs`` whose rows
    are both in ``runs`` (``{name: row}``, rows of :func:`score_model`): the accuracy difference on the same items
    with its 95% bootstrap interval; the bits-per-byte difference with its interval over the same documents when
    both rows kept them, else the plain difference of the means."""
    from moecompress.evals.paired import paired_difference, paired_ratio_difference

    lines = []
    for first, second in pairs:
        if first not in runs or second not in runs:
            continue
        a, b = runs[first], runs[second]
        accuracy = "-"
        if a.get("items") and b.get("items"):
            accuracy = str(paired_difference(a["items"], b["items"], tasks=list(accuracy_tasks)))
        if a.get("documents") and b.get("documents"):
            bpb = paired_ratio_difference(a["documents"], b["documents"])
            bpb_text = f"{bpb.mean:+.4f} [{bpb.low:+.4f}, {bpb.high:+.4f}]"
        else:
            bpb_text = f"{a['mean_bits_per_byte'] - b['mean_bits_per_byte']:+.4f}"
        lines.append((first, second, accuracy, bpb_text))
    return lines

"""Run a GGUF file in llama.cpp (llama-cpp-python) and write what it computes: logits, greedy text, tokenization,
per-document log-likelihoods.

Standalone on purpose: it runs in a Python that has ``llama_cpp`` (the ``llama`` extra, built from source) and never
imports moecompress, so what it measures is the file as llama.cpp reads it. The tests and ``benchmarks/gguf_quality.py`` call
it in a subprocess:

    python scripts/llama_cpp_runner.py REQUEST.json OUT_DIR

REQUEST.json: ``{"model": "x.gguf", "n_ctx": 2048, "threads": 2, "flash_attn": false, "ops": [...]}`` with ops

    {"op": "logits",   "tokens": [ids]}                    -> OUT_DIR/logits_<i>.npy, float32 [len(tokens), vocab]
    {"op": "generate", "tokens": [ids], "max_tokens": n}   -> greedy ids and their text (argmax, no sampling)
    {"op": "tokenize", "texts": [str]}                     -> llama.cpp's ids (no BOS, special tokens as text)
    {"op": "detokenize", "ids": [[ids]]}                   -> texts
    {"op": "score",    "docs": [[ids]]}                     -> per document: sum of ln p(token_t | tokens_<t) over
                                                              t >= 1 (the first id is the context), and the count

OUT_DIR/results.json holds one result per op, plus ``moecompress_imported`` (always false: checked by the tests).
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import Llama


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def all_logits(llm: Llama, tokens: list[int]) -> np.ndarray:
    """Logits after every token of ``tokens`` (a fresh context): ``[len(tokens), vocab]``."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def detokenize(llm: Llama, ids: list[int]) -> str:
    """llama.cpp's ``llama_detokenize`` of ``ids`` (special tokens not rendered). Called directly: the wrapper's
    ``Llama.detokenize`` reads each piece into a 32-byte buffer and cuts longer tokens (long whitespace runs)."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    tokens = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
    size = 16 * len(ids) + 64
    while True:
        buffer = ctypes.create_string_buffer(size)
        written = llama_cpp.llama_detokenize(vocab, tokens, len(ids), buffer, size, False, False)
        if written >= 0:
            return buffer.raw[:written].decode("utf-8", errors="replace")
        size = -written + 1


def generate(llm: Llama, tokens: list[int], max_tokens: int) -> list[int]:
    """Greedy continuation: the argmax of the logits, token by token."""
    llm.reset()
    llm.eval(tokens)
    produced = []
    for _ in range(max_tokens):
        next_id = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        produced.append(next_id)
        if next_id == llm.token_eos():
            break
        llm.eval([next_id])
    return produced


def score(llm: Llama, docs: list[list[int]]) -> list[dict]:
    results = []
    for tokens in docs:
        log_probs = log_softmax(all_logits(llm, tokens)[:-1])
        picked = log_probs[np.arange(len(tokens) - 1), np.asarray(tokens[1:])]
        results.append({"log_likelihood": float(picked.sum()), "tokens": len(tokens) - 1})
    return results


def main(request_path: str, out_dir: str) -> int:
    request = json.loads(Path(request_path).read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    llm = Llama(model_path=request["model"], n_ctx=int(request.get("n_ctx", 2048)), n_batch=int(request.get("n_ctx", 2048)),
                n_ubatch=int(request.get("n_ctx", 2048)), logits_all=True, n_threads=int(request.get("threads", 2)),
                flash_attn=bool(request.get("flash_attn", False)), verbose=False)
    results = []
    for index, op in enumerate(request["ops"]):
        kind = op["op"]
        if kind == "logits":
            np.save(out / f"logits_{index}.npy", all_logits(llm, op["tokens"]))
            results.append({"file": f"logits_{index}.npy"})
        elif kind == "generate":
            ids = generate(llm, op["tokens"], int(op["max_tokens"]))
            results.append({"ids": ids, "text": detokenize(llm, ids)})
        elif kind == "tokenize":
            results.append({"ids": [llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
                                    for text in op["texts"]]})
        elif kind == "detokenize":
            results.append({"texts": [detokenize(llm, ids) for ids in op["ids"]]})
        elif kind == "score":
            results.append({"docs": score(llm, op["docs"])})
        else:
            raise SystemExit(f"unknown op {kind!r}")
    (out / "results.json").write_text(json.dumps({"results": results,
                                                  "moecompress_imported": "moecompress" in sys.modules}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))

"""lm-eval's Hugging Face wrapper around a model already in memory, with an explicit, verified BOS.

Why not ``HFLM(add_bos_token=True)`` alone: that flag only asks the *tokenizer* to add its special tokens, which many
tokenizers do not do (the test-bed tokenizer adds nothing), and when they do, rolling-perplexity requests get BOS
twice (once from the tokenizer, once as lm-eval's prefix token). Here the tokenizer never adds special tokens and
the BOS id is put in front of every context exactly once (and context and choice are tokenized apart, see
:class:`BosPrefixedHFLM`):

* ``(context, choice)`` requests: ``[BOS] + context + choice``;
* context-free requests (``acc_mutual_info``'s ``P(choice)``): ``[BOS] + choice`` (lm-eval's prefix token);
* rolling perplexity: the first window is conditioned on ``[BOS]`` (lm-eval's prefix token).

That is how models trained on documents separated by ``<|endoftext|>`` saw text.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator

import lm_eval.models.huggingface as lm_eval_huggingface
from lm_eval.models.huggingface import HFLM

from moecompress import progress
from moecompress.errors import TaskError
from moecompress.logs import libraries_quiet


def default_bos_token_id(tokenizer: Any) -> int | None:
    """The token to condition every request on: the tokenizer's BOS, or None when it has none."""
    return getattr(tokenizer, "bos_token_id", None)


class BosPrefixedHFLM(HFLM):
    """HFLM over an in-memory model: contexts start with one optional BOS; context and choice are encoded apart.

    bos_token_id: the token every loglikelihood request is conditioned on (None: no BOS for ``(context, choice)``
        requests; lm-eval then still conditions empty contexts on the EOS token).
    encode_separately: True encodes the context and the continuation each on their own and concatenates the ids, so
        a choice is scored on exactly its own tokens. lm-eval's default (False) encodes ``context + choice`` in one
        go and moves the context's trailing whitespace into the choice; with byte-level BPE the newline that ends a
        context then merges with a choice's indentation, and the score of each choice includes a different piece of
        the context (on the test bed's ``tb_code_next`` that moved ``acc`` from 0.588 to 0.644).
    """

    def __init__(self, *, bos_token_id: int | None, encode_separately: bool = True, **kwargs: Any) -> None:
        # add_bos_token=False: the tokenizer itself adds nothing; BOS is placed here, exactly once. prefix_token_id:
        # lm-eval's own prefix for empty contexts and for the first rolling-perplexity window.
        if bos_token_id is not None:
            kwargs["prefix_token_id"] = bos_token_id
        super().__init__(add_bos_token=False, **kwargs)
        self.bos_token_id = bos_token_id
        self.encode_separately = encode_separately

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if self.encode_separately:
            context_ids = self.tok_encode(context, add_special_tokens=False)
            continuation_ids = self.tok_encode(continuation, add_special_tokens=False)
        else:
            context_ids, continuation_ids = super()._encode_pair(context, continuation)
        if self.bos_token_id is not None and (not context_ids or context_ids[0] != self.bos_token_id):
            context_ids = [self.bos_token_id, *context_ids]
        return context_ids, continuation_ids

    # Progress. In a quiet run (moecompress.logs) lm-eval's own bars are replaced by our progress: every request it
    # scores advances the run's innermost progress task (the evaluate stage's "evaluate ..." task). lm-eval passes
    # an explicit `disable=` to its bars, which overrides tqdm's TQDM_DISABLE default, so that is honoured here too.
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        with _requests_as_progress(len(requests)) as ours:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or ours or _progress_disabled())

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        windows = sum(self._rolling_windows(request.args[0]) for request in requests) if libraries_quiet() else 0
        with _requests_as_progress(windows) as ours:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or ours or _progress_disabled())

    def _rolling_windows(self, text: str) -> int:
        """How many model windows lm-eval scores ``text`` in (one per ``max_length`` tokens)."""
        return max(1, math.ceil(len(self.tok_encode(text)) / self.max_length))


def _progress_disabled() -> bool:
    return os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")


class _CountedRequests:
    """Stands in for tqdm inside lm-eval's HF model while our progress shows: a bar over requests advances our
    progress, a bar over an iterable only iterates; nothing is printed."""

    def __init__(self, iterable=None, *args, **kwargs) -> None:
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable if self.iterable is not None else ())

    def update(self, count: int = 1) -> None:
        progress.advance(count)

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _requests_as_progress(total: int) -> Iterator[bool]:
    """In a quiet run, count lm-eval's scored requests (``total`` of them) as our progress; yields whether it does."""
    if not libraries_quiet() or not hasattr(lm_eval_huggingface, "tqdm"):
        yield False
        return
    progress.add_total(total)
    original = lm_eval_huggingface.tqdm
    lm_eval_huggingface.tqdm = _CountedRequests
    try:
        yield True
    finally:
        lm_eval_huggingface.tqdm = original


def build_lm(
    model: Any,
    tokenizer: Any,
    *,
    batch_size: int | str = 16,
    add_bos_token: bool | None = None,
    encode_separately: bool = True,
) -> HFLM:
    """Wrap ``model`` (a ``PreTrainedModel`` in memory; never reloaded) for lm-eval.

    add_bos_token: True conditions every request on the tokenizer's BOS (an error if it has none); False leaves
        contexts as the tokenizer encodes them without special tokens; None (default) is True when a BOS exists.
    batch_size: requests per forward pass, or ``"auto"``.
    encode_separately: see :class:`BosPrefixedHFLM`.
    """
    bos_token_id = default_bos_token_id(tokenizer)
    if add_bos_token is None:
        add_bos_token = bos_token_id is not None
    if add_bos_token and bos_token_id is None:
        raise TaskError(
            "add_bos_token=True but the tokenizer has no BOS token; set tokenizer.bos_token or pass add_bos_token=False"
        )
    return BosPrefixedHFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_batch_size=max(64, _int_or(batch_size, 0)),
        bos_token_id=int(bos_token_id) if add_bos_token else None,
        encode_separately=encode_separately,
    )


def _int_or(value: int | str, default: int) -> int:
    return value if isinstance(value, int) else default

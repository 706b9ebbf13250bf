"""MoEQuant's Expert-Balanced Self-Sampling (EBSS): calibration sequences written by the model itself.

Spec: ``shared/reference/methods.md`` section 4. Each sequence minimises ``mean NLL + sigma / tau``, where sigma is
the expert-usage imbalance: per MoE layer, the unbiased standard deviation (over experts) of the top-k selection
frequencies (counts / selections) of the sequence's tokens, averaged over MoE layers. The search is a beam search
with *deferred* balance:

1. the first token is drawn uniformly from the non-special tokens (after the document separator: every row of a
   :class:`CalibrationSet` starts with it, as the model saw documents in training);
2. at each step every beam runs one forward step (KV cache), giving the next-token log-probs and the beam's
   routing counts so far, hence ``sigma(beam)``; each extension ``beam + v`` scores
   ``-(RS(beam) + log p(v)) / (j + 1) + sigma(beam) / tau`` (``RS`` the cumulative log-prob, ``j`` the tokens after
   the separator): the *parent's* sigma, since the child's routing is known only once it is forwarded. Only the
   ``top_m`` most likely tokens per beam are scored (exact when ``top_m >= beam``: siblings share sigma);
3. the ``beam`` lowest scores over all extensions survive; the best final beam is the sequence.

Two forms of the balance term (``EbssOptions.sigma`` and ``balance_on``):

* ``sigma: counts, balance_on: child`` (``preset: moequant_paper``, the paper's Algorithm 1 as the issue review read
  it): sigma on raw selection *counts* with the figure's prefactor, ``sqrt(E / (E - 1) * sum_e (c_e - mean c)^2)``
  (``sqrt(E) * selections`` times the frequency form), scored on the *child* sequence ``beam + v``: the
  ``child_top_m`` most likely extensions of every beam are forwarded (one token each, on the beam's KV cache) to
  know their routing, and the chosen children's logits serve the next step. In count units the balance term grows
  with the sequence, which is what makes the paper's ``tau = 1.2`` bite;
* ``sigma: frequency, balance_on: parent`` (the spec's reading, methods.md 4, and the default): the unbiased std of
  selection frequencies of the parent beam (deferred balance), no extra forward; it needs ``tau`` about 0.001-0.01
  on the test bed to move the search at all.

The default (``tau: 0.001`` on frequencies of the parent, ``no_repeat_ngram: 4``) is the setting that measured best
for 2-bit GPTQ calibrated on the set (README "Quality review", ``benchmarks/mcmoe.py --score calibration``): bits per
byte on the calibration text 0.026 (mx) and 0.006 (q3) below the paper preset, and 0.15 / 0.06 below the former
default ``tau: 1.2``, which equals plain beam search. Text calibration still beats every self-sampled set on both
test-bed models (by 0.02-0.05); EBSS is for when no text like the users' is at hand.

``tau = inf`` is plain beam search by cumulative log-prob. Routing comes from the model's own routers through the
uniform views (``MoEBlockView.route`` on each MoE block's input), so every supported family works, pruned models
included (EBSS on a pruned model must be regenerated with it: balance is over the surviving experts).

Sets are cached on disk by a fingerprint of the model (config and sampled weights) and the options.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import pydantic
import safetensors.torch
import torch
from transformers import DynamicCache
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

from moecompress.calibration.data import CalibrationSet, load_calibration, separator_token_id
from moecompress.checkpoint.loading import load_model
from moecompress.errors import CalibrationError
from moecompress.models import find_moe_blocks

CACHE_VERSION = 1
EBSS_DOMAIN = "ebss"
SIGMA_KINDS = ("frequency", "counts")
# preset moequant_paper: the paper's balance term (counts, the child sequence) at its tau 1.2
# (no n-gram ban, as in the paper: 0 = off)
PRESETS = {"moequant_paper": {"sigma": "counts", "balance_on": "child", "tau": 1.2, "no_repeat_ngram": 0}}
DEFAULTS = {"sigma": "frequency", "balance_on": "parent", "tau": 0.001, "no_repeat_ngram": 4}


class EbssOptions(pydantic.BaseModel):
    """MoEQuant EBSS settings, also the recipe's ``calibration: {ebss: ...}`` section (methods.md 4).

    num_samples x seq_len tokens (separator included; None: the recipe's calibration section's, 128 x 512 when
    called directly); tau: balance temperature (``inf`` = plain beam search); beam: beam width; top_m: extensions
    scored per beam (``balance_on: parent``); sigma: ``frequency`` or ``counts`` (module docstring); balance_on:
    ``parent`` (deferred) or ``child`` (forwards ``child_top_m`` extensions per beam to score their own balance);
    preset: ``moequant_paper`` (counts, child, tau 1.2, no n-gram ban);
    no_repeat_ngram: ban repeating n-grams of this length (default 4; 0 = off, as in the paper); seed: the first tokens
    (None: the section's, 0 directly); batch_size: sequences searched together (``batch_size * beam`` rows);
    cache_dir: where generated sets are cached (default :func:`default_cache_dir`); compare_text: a recipe also
    samples the section's text source at the same size and reports both sets' expert-usage std.

    A bad value is a ``pydantic.ValidationError`` naming the field (in a recipe, a ``RecipeError``), as for stages.
    """

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    num_samples: int | None = pydantic.Field(None, ge=1)
    seq_len: int | None = pydantic.Field(None, ge=2)
    tau: float | None = pydantic.Field(None, gt=0)  # .inf: plain beam search by log-prob
    beam: int = pydantic.Field(4, ge=1)
    top_m: int = pydantic.Field(64, ge=1)
    sigma: Literal["frequency", "counts"] | None = None
    balance_on: Literal["parent", "child"] | None = None
    child_top_m: int = pydantic.Field(8, ge=1)
    preset: Literal["moequant_paper"] | None = None
    no_repeat_ngram: int | None = pydantic.Field(None, ge=0)
    seed: int | None = None
    batch_size: int = pydantic.Field(8, ge=1)
    cache_dir: str | None = None
    compare_text: bool = True

    @pydantic.model_validator(mode="before")
    @classmethod
    def _preset_and_defaults(cls, values):
        """Fill ``sigma``, ``balance_on``, ``tau`` and ``no_repeat_ngram`` from the preset, else from
        :data:`DEFAULTS` (the balance form a preset fixes may be repeated, not contradicted)."""
        if not isinstance(values, dict):
            return values
        values = dict(values)
        defaults = dict(DEFAULTS)
        preset = values.get("preset")
        if preset in PRESETS:
            fixed = PRESETS[preset]
            contradicting = [name for name in ("sigma", "balance_on") if values.get(name) not in (None, fixed[name])]
            if contradicting:
                raise ValueError(f"preset {preset!r} fixes {contradicting}; give either the preset or the values")
            defaults.update(fixed)
        for name, value in defaults.items():
            if values.get(name) is None:
                values[name] = value
        return values

    @pydantic.model_validator(mode="after")
    def _enough_candidates(self):
        if self.top_m < self.beam:
            raise ValueError(f"top_m ({self.top_m}) must be >= beam ({self.beam}): the search is exact only then")
        return self

    def resolved(self, num_samples: int = 128, seq_len: int = 512, seed: int = 0) -> "EbssOptions":
        """These options with the sizes and seed left unset taken from the arguments (a recipe's section)."""
        return self.model_copy(update={
            "num_samples": self.num_samples or num_samples, "seq_len": self.seq_len or seq_len,
            "seed": seed if self.seed is None else self.seed})

    def cache_fields(self) -> dict:
        """What the generated tokens depend on (batch_size changes them at most by float rounding)."""
        resolved = self.resolved()
        fields = {"num_samples": resolved.num_samples, "seq_len": resolved.seq_len,
                  "tau": "inf" if math.isinf(self.tau) else self.tau, "beam": self.beam, "top_m": self.top_m,
                  "no_repeat_ngram": self.no_repeat_ngram or None, "seed": resolved.seed}  # 0 and None: off
        if (self.sigma, self.balance_on) != ("frequency", "parent"):  # older caches keep their keys
            fields.update(sigma=self.sigma, balance_on=self.balance_on)
            if self.balance_on == "child":
                fields["child_top_m"] = self.child_top_m
        return fields


@dataclass
class EbssCalibrationSet(CalibrationSet):
    """A :class:`CalibrationSet` generated by EBSS (domain ``ebss``), with its expert-usage balance.

    usage_std: sigma of the whole set (pooled counts), averaged over MoE layers; usage_std_per_layer: per layer.
    reference_usage_std / reference_sources: the same for a text calibration set of the same size, when compared.
    """

    options: dict = field(default_factory=dict)
    model_fingerprint: str = ""
    usage_std: float = float("nan")
    usage_std_per_layer: list[float] = field(default_factory=list)
    reference_usage_std: float | None = None
    reference_usage_std_per_layer: list[float] | None = None
    reference_sources: list[str] | None = None
    from_cache: bool = False

    def describe(self) -> dict:
        record = super().describe()
        record["ebss"] = {
            "options": self.options,
            "model_fingerprint": self.model_fingerprint,
            "usage_std": self.usage_std,
            "usage_std_per_layer": self.usage_std_per_layer,
            "text_usage_std": self.reference_usage_std,
            "text_usage_std_per_layer": self.reference_usage_std_per_layer,
            "text_sources": self.reference_sources,
            "from_cache": self.from_cache,
        }
        return record


# ----- routing counts --------------------------------------------------------------------------------------------
class RoutingCounter:
    """Counts, for every MoE layer, which experts each row's new tokens select (top-k), during a forward.

    Used as a context manager around forwards: ``counter.step_counts`` is ``[rows, layers, experts]`` for the
    tokens of the last forward. Hooks read each MoE block's input and route it with the uniform view.
    """

    def __init__(self, model) -> None:
        self.views = find_moe_blocks(model)
        self.experts_per_layer = [view.num_experts for view in self.views]  # may differ after per-layer pruning
        self.num_experts = max(self.experts_per_layer)
        self.step_counts: torch.Tensor | None = None
        self._handles = []

    def __enter__(self) -> "RoutingCounter":
        for layer, view in enumerate(self.views):
            self._handles.append(view.block.register_forward_pre_hook(self._hook(layer, view), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self, rows: int) -> None:
        self.step_counts = torch.zeros(rows, len(self.views), self.num_experts, dtype=torch.float64)

    def _hook(self, layer: int, view):
        def record(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rows = hidden.shape[0]
            with torch.no_grad():
                picks = view.route(hidden.reshape(-1, hidden.shape[-1])).top_k_index.reshape(rows, -1)
            ones = torch.ones(picks.shape, dtype=torch.float64)
            self.step_counts[:, layer].scatter_add_(1, picks.cpu(), ones)
        return record


def usage_sigma(counts: torch.Tensor, experts_per_layer: list[int] | None = None,
                kind: str = "frequency") -> torch.Tensor:
    """counts ``[..., layers, experts]`` -> sigma ``[...]``, per layer (:func:`per_layer_sigma`) averaged over layers
    (methods.md 4(c), "balance metric").

    experts_per_layer: a layer's real expert count when layers differ (the padding columns are left out).
    """
    return per_layer_sigma(counts, experts_per_layer, kind).mean(dim=-1)


def per_layer_sigma(counts: torch.Tensor, experts_per_layer: list[int] | None = None,
                    kind: str = "frequency") -> torch.Tensor:
    """counts ``[..., layers, experts]`` -> ``[..., layers]``.

    kind ``frequency``: the unbiased std of each layer's selection frequencies ``counts / counts.sum()``;
    ``counts``: MoEQuant's figure, ``sqrt(E / (E - 1) * sum_e (c_e - mean c)^2)`` on the raw counts ``c``.
    """
    if kind not in SIGMA_KINDS:
        raise ValueError(f"sigma kind {kind!r} is not known; use one of {list(SIGMA_KINDS)}")
    if experts_per_layer is None or all(size == counts.shape[-1] for size in experts_per_layer):
        if kind == "counts":
            experts = counts.shape[-1]
            spread = (counts - counts.mean(dim=-1, keepdim=True)).pow(2).sum(dim=-1)
            return (spread * experts / max(experts - 1, 1)).sqrt()
        frequencies = counts / counts.sum(dim=-1, keepdim=True).clamp(min=1)
        return frequencies.std(dim=-1, correction=1)
    return torch.stack([per_layer_sigma(counts[..., layer, :size], kind=kind)
                        for layer, size in enumerate(experts_per_layer)], dim=-1)


def expert_usage_std(model, input_ids: torch.Tensor, *, batch_size: int = 8) -> tuple[float, list[float]]:
    """sigma of a token set ``[N, S]`` (counts pooled over all its tokens): ``(mean over layers, per layer)``."""
    device = next(model.parameters()).device
    with RoutingCounter(model) as counter, torch.no_grad():
        total = torch.zeros(len(counter.views), counter.num_experts, dtype=torch.float64)
        for start in range(0, input_ids.shape[0], batch_size):
            rows = input_ids[start:start + batch_size]
            counter.reset(rows.shape[0])
            model(input_ids=rows.to(device), use_cache=False)
            total += counter.step_counts.sum(dim=0)
    per_layer = per_layer_sigma(total, counter.experts_per_layer)
    return float(per_layer.mean()), [float(value) for value in per_layer]


# ----- the search ------------------------------------------------------------------------------------------------
def first_token_candidates(tokenizer, vocab_size: int) -> torch.Tensor:
    """Ids the first token is drawn from: the tokenizer's vocabulary without special or added tokens."""
    size = min(len(tokenizer), vocab_size)
    excluded = set(getattr(tokenizer, "all_special_ids", [])) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    candidates = torch.tensor([token for token in range(size) if token not in excluded], dtype=torch.long)
    if candidates.numel() == 0:
        raise CalibrationError("the tokenizer has no ordinary (non-special) tokens to start EBSS sequences with")
    return candidates


def ebss_search(model, first_tokens: torch.Tensor, separator: int, options: EbssOptions, *, vocab_limit: int,
                on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """Beam search with deferred balance for a batch of sequences.

    first_tokens ``[B]`` -> token ids ``[B, seq_len]`` (separator, first token, ``seq_len - 2`` searched tokens).
    ``vocab_limit``: logits of ids at or beyond it (embedding padding past the tokenizer) are never chosen.
    """
    options = options.resolved()
    if options.balance_on == "child" and math.isfinite(options.tau):
        return _child_balance_search(model, first_tokens, separator, options, vocab_limit=vocab_limit,
                                     on_step=on_step)
    batch, width = first_tokens.shape[0], options.beam
    device = next(model.parameters()).device
    rows = batch * width
    tokens = torch.stack([torch.full_like(first_tokens, separator), first_tokens], dim=1).repeat_interleave(width, 0)
    log_prob_sum = torch.zeros(rows, dtype=torch.float64)  # RS: the first token is drawn, not scored
    alive = torch.zeros(batch, width, dtype=torch.bool)
    alive[:, 0] = True  # one parent at first; the other beams start as copies that may not be chosen
    banned = NoRepeatNGramLogitsProcessor(options.no_repeat_ngram) if options.no_repeat_ngram else None
    cache = DynamicCache()
    cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    step_input = tokens
    with RoutingCounter(model) as counter, torch.no_grad():
        counts = torch.zeros(rows, len(counter.views), counter.num_experts, dtype=torch.float64)
        while tokens.shape[1] < options.seq_len:
            counter.reset(rows)
            logits = model(input_ids=step_input.to(device), use_cache=True, **{cache_argument: cache}).logits[:, -1]
            counts += counter.step_counts
            log_probs = torch.log_softmax(logits.float().cpu(), dim=-1).double()
            log_probs[:, vocab_limit:] = -math.inf
            if banned is not None:
                log_probs = banned(tokens, log_probs)
            top_log_probs, top_tokens = log_probs.topk(options.top_m, dim=-1)  # [rows, m]
            generated = tokens.shape[1] - 1  # j: tokens after the separator
            if math.isfinite(options.tau):
                balance = usage_sigma(counts, counter.experts_per_layer, options.sigma) / options.tau
            else:  # plain beam search by log-prob
                balance = torch.zeros(rows, dtype=torch.float64)
            scores = -(log_prob_sum[:, None] + top_log_probs) / (generated + 1) + balance[:, None]  # lower is better
            scores = scores.masked_fill(~alive.reshape(rows, 1), math.inf).reshape(batch, width * options.top_m)
            best = scores.topk(width, dim=-1, largest=False).indices  # [B, w], best first
            parent = (best // options.top_m + torch.arange(batch)[:, None] * width).reshape(-1)
            pick = (best % options.top_m).reshape(-1)
            next_token = top_tokens[parent, pick]
            log_prob_sum = log_prob_sum[parent] + top_log_probs[parent, pick]
            tokens = torch.cat([tokens[parent], next_token[:, None]], dim=1)
            counts = counts[parent]
            cache.reorder_cache(parent.to(device))
            alive[:] = True
            step_input = next_token[:, None]
            if on_step is not None:
                on_step()
    return tokens.reshape(batch, width, -1)[:, 0]  # beams are kept best first


def _child_balance_search(model, first_tokens: torch.Tensor, separator: int, options: EbssOptions, *,
                          vocab_limit: int, on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """:func:`ebss_search` with the balance of the *child* sequence: each step forwards the ``child_top_m`` most
    likely extensions of every beam (``beam * child_top_m`` rows on the beams' KV cache), scores each child by
    ``-(RS + log p(v)) / (j + 1) + sigma(child) / tau`` and keeps the ``beam`` best; the kept children's logits are
    the next step's, so no other forward runs. ``[B]`` -> ``[B, seq_len]``."""
    batch, width, fan = first_tokens.shape[0], options.beam, options.child_top_m
    device = next(model.parameters()).device
    rows = batch * width
    tokens = torch.stack([torch.full_like(first_tokens, separator), first_tokens], dim=1).repeat_interleave(width, 0)
    log_prob_sum = torch.zeros(rows, dtype=torch.float64)
    alive = torch.zeros(batch, width, dtype=torch.bool)
    alive[:, 0] = True
    banned = NoRepeatNGramLogitsProcessor(options.no_repeat_ngram) if options.no_repeat_ngram else None
    cache = DynamicCache()
    cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with RoutingCounter(model) as counter, torch.no_grad():
        counter.reset(rows)
        logits = model(input_ids=tokens.to(device), use_cache=True, **{cache_argument: cache}).logits[:, -1]
        counts = counter.step_counts.clone()  # [rows, layers, experts] of the prefix
        while tokens.shape[1] < options.seq_len:
            log_probs = torch.log_softmax(logits.float().cpu(), dim=-1).double()
            log_probs[:, vocab_limit:] = -math.inf
            if banned is not None:
                log_probs = banned(tokens, log_probs)
            top_log_probs, top_tokens = log_probs.topk(fan, dim=-1)  # [rows, fan]
            parents = torch.arange(rows).repeat_interleave(fan)  # child row -> its beam
            cache.reorder_cache(parents.to(device))
            counter.reset(rows * fan)
            child_logits = model(input_ids=top_tokens.reshape(-1, 1).to(device), use_cache=True,
                                 **{cache_argument: cache}).logits[:, -1]
            child_counts = counts[parents] + counter.step_counts  # [rows * fan, layers, experts]
            balance = usage_sigma(child_counts, counter.experts_per_layer, options.sigma) / options.tau
            generated = tokens.shape[1] - 1
            scores = -(log_prob_sum[:, None] + top_log_probs) / (generated + 1) + balance.reshape(rows, fan)
            scores = scores.masked_fill(~alive.reshape(rows, 1), math.inf).reshape(batch, width * fan)
            best = scores.topk(width, dim=-1, largest=False).indices  # [B, w], best first
            chosen = (best + torch.arange(batch)[:, None] * width * fan).reshape(-1)  # child rows
            parent, pick = chosen // fan, chosen % fan
            log_prob_sum = log_prob_sum[parent] + top_log_probs[parent, pick]
            tokens = torch.cat([tokens[parent], top_tokens[parent, pick][:, None]], dim=1)
            counts = child_counts[chosen]
            logits = child_logits[chosen.to(child_logits.device)]
            cache.reorder_cache(chosen.to(device))
            alive[:] = True
            if on_step is not None:
                on_step()
    return tokens.reshape(batch, width, -1)[:, 0]


def generate_ebss(model, tokenizer, options: EbssOptions | None = None, *, cache_dir: str | Path | None = None,
                  on_step: Callable[[int, int], None] | None = None,
                  reference: CalibrationSet | None = None) -> EbssCalibrationSet:
    """An EBSS calibration set written by ``model`` (cached in ``cache_dir``, default ``~/.cache/moecompress/ebss``).

    on_step(done, total): progress in search steps. reference: a text calibration set whose expert-usage sigma is
    reported beside the EBSS set's (``describe()["ebss"]``).
    """
    options = (options or EbssOptions()).resolved()
    separator = separator_token_id(tokenizer)
    fingerprint = model_fingerprint(model)
    path = _cache_path(cache_dir, fingerprint, options)
    cached = _read_cache(path)
    if cached is not None:
        input_ids, usage_std, per_layer = cached
        from_cache = True
    else:
        input_ids = _search_all(model, tokenizer, options, separator, on_step)
        usage_std, per_layer = expert_usage_std(model, input_ids, batch_size=options.batch_size * options.beam)
        _write_cache(path, input_ids, {"options": options.cache_fields(), "fingerprint": fingerprint,
                                       "usage_std": usage_std, "usage_std_per_layer": per_layer})
        from_cache = False
    result = EbssCalibrationSet(
        input_ids=input_ids, domains=[EBSS_DOMAIN] * input_ids.shape[0], sources=[f"ebss:{fingerprint[:16]}"],
        seed=options.seed, separator_token_id=separator, options=options.cache_fields(),
        model_fingerprint=fingerprint, usage_std=usage_std, usage_std_per_layer=per_layer, from_cache=from_cache,
    )
    if reference is not None:
        result.reference_usage_std, result.reference_usage_std_per_layer = expert_usage_std(
            model, reference.input_ids, batch_size=options.batch_size * options.beam)
        result.reference_sources = list(reference.sources)
    return result


def _search_all(model, tokenizer, options: EbssOptions, separator: int, on_step) -> torch.Tensor:
    vocab_limit = min(len(tokenizer), int(model.get_output_embeddings().weight.shape[0]))
    candidates = first_token_candidates(tokenizer, vocab_limit)
    generator = torch.Generator().manual_seed(options.seed)
    first_tokens = candidates[torch.randint(len(candidates), (options.num_samples,), generator=generator)]
    steps_per_batch = options.seq_len - 2
    batches = range(0, options.num_samples, options.batch_size)
    total, done = len(batches) * steps_per_batch, 0

    def step() -> None:
        nonlocal done
        done += 1
        if on_step is not None:
            on_step(done, total)

    sequences = [ebss_search(model, first_tokens[start:start + options.batch_size], separator, options,
                             vocab_limit=vocab_limit, on_step=step) for start in batches]
    return torch.cat(sequences, dim=0).cpu()


# ----- cache -----------------------------------------------------------------------------------------------------
def model_fingerprint(model) -> str:
    """sha256 of the model's config and, for every parameter and buffer, its name, shape, dtype and a strided
    sample of up to 4,096 values: cheap on any model size, and it changes with any edit (pruning changes shapes,
    quantization dtypes and values)."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel():
            sample = flat[:: max(1, flat.numel() // 4096)][:4096]
            digest.update(sample.to(torch.float64).cpu().numpy().tobytes())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """``$MOECOMPRESS_CACHE/ebss``, else ``$XDG_CACHE_HOME/moecompress/ebss``, else ``~/.cache/moecompress/ebss``."""
    if os.environ.get("MOECOMPRESS_CACHE"):
        return Path(os.environ["MOECOMPRESS_CACHE"]) / "ebss"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "moecompress" / "ebss"


def _cache_path(cache_dir, fingerprint: str, options: EbssOptions) -> Path:
    key = json.dumps({"version": CACHE_VERSION, "model": fingerprint, "options": options.cache_fields()},
                     sort_keys=True)
    name = f"ebss-{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"
    return Path(cache_dir or default_cache_dir()).expanduser() / name


def _read_cache(path: Path):
    if not path.is_file():
        return None
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = json.loads(handle.metadata()["moecompress_ebss"])
            input_ids = handle.get_tensor("input_ids")
    except Exception:  # noqa: BLE001 - a damaged cache entry is regenerated, not fatal
        return None
    return input_ids, float(metadata["usage_std"]), [float(value) for value in metadata["usage_std_per_layer"]]


def _write_cache(path: Path, input_ids: torch.Tensor, metadata: dict) -> None:
    """Write to a temporary name in the same folder, then rename (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{time.time_ns()}")
    safetensors.torch.save_file({"input_ids": input_ids.contiguous()}, str(temporary),
                                metadata={"moecompress_ebss": json.dumps(metadata)})
    os.replace(temporary, path)


# ----- the recipe's `calibration: {ebss: ...}` --------------------------------------------------------------------
def ebss_calibration(checkpoint_folder, tokenizer, config, *, device=None, dtype=None,
                     progress=None) -> EbssCalibrationSet:
    """The calibration set of a recipe whose ``calibration`` section has ``ebss:`` (``config`` is that section).

    The EBSS set has ``ebss.num_samples x ebss.seq_len`` tokens (default: the section's). Unless
    ``ebss.compare_text`` is false, the section's text source (files, dataset, or the bundled set) is sampled at
    the same size first (bad files fail before the model loads) and its expert-usage sigma is reported beside the
    EBSS set's. ``progress``: a :class:`moecompress.pipeline.ProgressReporter` (bar ``ebss calibration``).
    """
    section = config.ebss
    options = section.resolved(num_samples=config.num_samples, seq_len=config.seq_len, seed=config.seed)
    reference = None
    if section.compare_text:
        reference = load_calibration(tokenizer, files=config.files, dataset=config.dataset,
                                     dataset_config=config.dataset_config, dataset_split=config.dataset_split,
                                     num_samples=options.num_samples, seq_len=options.seq_len, seed=config.seed)
    model, _ = load_model(str(checkpoint_folder), dtype=dtype or torch.float32, device=device or "cpu")
    on_step = None
    if progress is not None:
        progress.start("ebss calibration", None)
        on_step = lambda done, total: progress.update("ebss calibration", done, total)  # noqa: E731
    try:
        return generate_ebss(model, tokenizer, options, cache_dir=options.cache_dir, reference=reference,
                             on_step=on_step)
    finally:
        if progress is not None:
            progress.finish("ebss calibration")
        del model

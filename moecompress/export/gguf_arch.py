"""The llama.cpp architectures the GGUF export writes, and what each one needs that the checkpoint does not say
the same way: its hyperparameter keys, the configs it cannot represent, and the weights it stores in another order.

    Hugging Face model_type   llama.cpp architecture   differences handled here
    qwen3_moe                 qwen3moe                 none (llama.cpp's NEOX rope is HF's rotate_half)
    mixtral                   llama                    q/k rows permuted: llama.cpp rotates adjacent pairs
    deepseek_v3               deepseek2                kv_b_proj split into attn_k_b (transposed) / attn_v_b;
                                                       sigmoid gating written explicitly; output.weight written
                                                       even when tied (older loaders require it)

Keys are written with the ``gguf`` package's typed helpers (llama.cpp's loader checks value types), and tensor
names come from its ``TensorNameMap`` (the converter's own HF -> GGUF name table). What llama.cpp hard-codes and a
config could contradict is refused (:func:`check_config`): llama.cpp renormalises the top-k weights of qwen3moe and
Mixtral, has no sliding window for them, no attention biases, and no rope scaling is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import torch

from moecompress.errors import UnsupportedModelError


@dataclass(frozen=True)
class Architecture:
    model_type: str
    arch: gguf.MODEL_ARCH
    permute_qk: bool = False  # Mixtral: HF's rotate_half rope -> llama.cpp's adjacent-pair rope
    split_kv_b: bool = False  # DeepSeek MLA: kv_b_proj -> attn_k_b + attn_v_b
    output_when_tied: bool = False  # write output.weight (a copy of the embedding) for a tied model

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


ARCHITECTURES = {
    "qwen3_moe": Architecture("qwen3_moe", gguf.MODEL_ARCH.QWEN3MOE),
    "mixtral": Architecture("mixtral", gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "deepseek_v3": Architecture("deepseek_v3", gguf.MODEL_ARCH.DEEPSEEK2, split_kv_b=True, output_when_tied=True),
}


def architecture_of(model_type: str) -> Architecture:
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} has no GGUF export; llama.cpp runs these MoE families from moecompress: "
            f"{', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def rope_theta(config: dict) -> float:
    parameters = config.get("rope_parameters") or {}
    return float(parameters.get("rope_theta", config.get("rope_theta", 10000.0)))


def _rope_type(config: dict) -> str:
    parameters = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return str(parameters.get("rope_type", parameters.get("type", "default")) or "default")


def check_config(architecture: Architecture, config: dict) -> None:
    """One-line UnsupportedModelError for what llama.cpp's ``architecture`` would compute differently."""
    problems = []
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']!r} (llama.cpp uses SiLU here)")
    if _rope_type(config) != "default":
        problems.append(f"rope type {_rope_type(config)!r} (only plain rope is written)")
    if architecture.model_type == "qwen3_moe":
        if not config.get("norm_topk_prob", True):
            problems.append("norm_topk_prob false (llama.cpp always renormalises qwen3moe's top-k weights)")
        if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step", 1)) != 1:
            problems.append("dense layers among the MoE layers (mlp_only_layers / decoder_sparse_step)")
        if config.get("attention_bias") or config.get("use_sliding_window"):
            problems.append("attention biases or sliding-window attention")
    if architecture.model_type == "mixtral" and config.get("sliding_window"):
        problems.append(f"sliding_window {config['sliding_window']} (llama.cpp's llama architecture has none)")
    if architecture.model_type == "deepseek_v3":
        if not config.get("rope_interleave", True):
            problems.append("rope_interleave false (the rope rows would need permuting; not written yet)")
        if config.get("scoring_func", "sigmoid") != "sigmoid":
            problems.append(f"scoring_func {config['scoring_func']!r} (DeepSeek-V3 routing is sigmoid)")
        if config.get("q_lora_rank") is None:
            problems.append("q_lora_rank null (the 'lite' layout without q_a/q_b)")
    if problems:
        raise UnsupportedModelError(f"{architecture.model_type} with {'; '.join(problems)} cannot be written as GGUF "
                                    "exactly; export another format")


def write_hyperparameters(writer: gguf.GGUFWriter, architecture: Architecture, config: dict, *, expert_count: int,
                          vocab_size: int) -> None:
    """The ``{arch}.*`` keys llama.cpp's loader reads for ``architecture`` (values from the HF config)."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_expert_count(expert_count)
    writer.add_expert_used_count(int(config["num_experts_per_tok"]))
    writer.add_vocab_size(vocab_size)
    if architecture.model_type == "deepseek_v3":
        _write_deepseek(writer, config, heads)
        return
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    if architecture.model_type == "qwen3_moe":
        writer.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))


def _write_deepseek(writer: gguf.GGUFWriter, config: dict, heads: int) -> None:
    nope, rope, value = (int(config["qk_nope_head_dim"]), int(config["qk_rope_head_dim"]), int(config["v_head_dim"]))
    kv_lora = int(config["kv_lora_rank"])
    # MLA runs as multi-query attention over the compressed kv: one kv head of kv_lora + rope dims
    writer.add_head_count_kv(1)
    writer.add_key_length(kv_lora + rope)
    writer.add_value_length(kv_lora)
    writer.add_key_length_mla(nope + rope)
    writer.add_value_length_mla(value)
    writer.add_rope_dimension_count(rope)
    writer.add_q_lora_rank(int(config["q_lora_rank"]))
    writer.add_kv_lora_rank(kv_lora)
    writer.add_leading_dense_block_count(int(config.get("first_k_dense_replace", 0)))
    writer.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))
    writer.add_expert_shared_count(int(config.get("n_shared_experts") or 0))
    writer.add_expert_weights_scale(float(config.get("routed_scaling_factor", 1.0)))
    writer.add_expert_weights_norm(bool(config.get("norm_topk_prob", True)))
    # llama.cpp defaults to softmax when the key is absent; V3 routes with a sigmoid
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    groups = int(config.get("n_group") or 1)
    if groups > 1:
        writer.add_expert_group_count(groups)
        writer.add_expert_group_used_count(int(config.get("topk_group") or groups))


def rope_pair_permutation(rows: int, heads: int) -> torch.Tensor:
    """Row order that turns HF's rotate_half rope layout into llama.cpp's adjacent pairs: in each head of
    ``rows // heads`` rows, new row ``2i`` is old row ``i`` and new row ``2i + 1`` is old row ``i + head_dim / 2``."""
    head_dim = rows // heads
    return torch.arange(rows).reshape(heads, 2, head_dim // 2).transpose(1, 2).reshape(-1)


def kv_b_rows(config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``kv_b_proj`` ``[heads * (nope + v), kv_lora]`` holding each head's key part and value part,
    head by head (HF splits each head's output as ``[k_nope | value]``)."""
    heads = int(config["num_attention_heads"])
    nope, value = int(config["qk_nope_head_dim"]), int(config["v_head_dim"])
    per_head = torch.arange(heads * (nope + value)).reshape(heads, nope + value)
    return per_head[:, :nope].reshape(-1), per_head[:, nope:].reshape(-1)

"""Tiny random models of every supported family, built from each family's own transformers config class.

They exist so that tests (ours and every other module's) can check a behaviour on each architecture in
milliseconds: hidden size 32, two decoder layers, eight routed experts. Their weights are random (seeded), so
they check semantics (equivalence, edits, save/reload), never quality.
"""

from __future__ import annotations

import torch
import transformers

# Sizes common to every tiny model.
_COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)

# family model_type -> (config class name, family-specific fields). Routing options are set to the non-default
# branch where a family has one (groups on for DeepSeek, no renormalisation for Qwen2-MoE / OLMoE) so that the
# equivalence tests cover it.
_TINY_SPECS: dict[str, tuple[str, dict]] = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            intermediate_size=24,
            norm_topk_prob=False,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=24, norm_topk_prob=True),
    ),
    "qwen3_5_moe_text": (
        "Qwen3_5MoeTextConfig",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            layer_types=["linear_attention", "full_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
        ),
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            intermediate_size=24,
            norm_topk_prob=True,
            layer_types=["linear_attention", "full_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
        ),
    ),
    "olmoe": ("OlmoeConfig", dict(num_experts=8, num_experts_per_tok=2, intermediate_size=16, norm_topk_prob=False)),
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            intermediate_size=24,
            n_shared_experts=2,
            first_k_dense_replace=1,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            num_hidden_layers=3,
            num_key_value_heads=4,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            intermediate_size=24,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            num_key_value_heads=4,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            num_hidden_layers=3,
        ),
    ),
    "gpt_oss": (
        "GptOssConfig",
        dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16, layer_types=["sliding_attention", "full_attention"], sliding_window=16),
    ),
    "phimoe": ("PhimoeConfig", dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16)),
    "granitemoe": ("GraniteMoeConfig", dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16)),
    "glm4_moe": (
        "Glm4MoeConfig",
        dict(
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=24,
            n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=1.5,
            num_hidden_layers=3,
        ),
    ),
    "dots1": (
        "Dots1Config",
        dict(
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=24,
            n_shared_experts=2, first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.0,
            norm_topk_prob=True, num_hidden_layers=3, layer_types=["full_attention"] * 3,
        ),
    ),
    "solar_open": (
        "SolarOpenConfig",
        dict(
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
            n_group=2, topk_group=1, routed_scaling_factor=1.5,
        ),
    ),
    "minimax": (
        "MiniMaxConfig",
        dict(
            num_local_experts=8, num_experts_per_tok=2, intermediate_size=16,
            layer_types=["full_attention", "linear_attention"],
        ),
    ),
    "flex_olmo": (
        "FlexOlmoConfig",
        dict(num_experts=8, num_experts_per_tok=2, intermediate_size=16, norm_topk_prob=True, pad_token_id=0, eos_token_id=0),
    ),
    "llama4_text": (
        "Llama4TextConfig",
        dict(
            num_local_experts=8, num_experts_per_tok=2, intermediate_size=16, intermediate_size_mlp=24,
            interleave_moe_layer_step=1, pad_token_id=0, eos_token_id=0, bos_token_id=0,
        ),
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        dict(
            moe_num_experts=8, moe_k=2, moe_intermediate_size=16, intermediate_size=24, moe_num_shared_experts=2,
            moe_layer_start_index=1, moe_layer_end_index=2, num_hidden_layers=3, moe_norm_min=0.9,
        ),
    ),
    "minimax_m2": ("MiniMaxM2Config", dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16)),
    "glm4_moe_lite": (
        "Glm4MoeLiteConfig",
        dict(
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=24,
            n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=1.5, num_hidden_layers=3,
            num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8, mlp_layer_types=["dense", "sparse", "sparse"],
        ),
    ),
    "deepseek_v32": (
        "DeepseekV32Config",
        dict(
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=24,
            n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
            num_hidden_layers=3, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8, index_topk=8, index_head_dim=16, index_n_heads=2,
            mlp_layer_types=["dense", "sparse", "sparse"],
        ),
    ),
    "exaone_moe": (
        "ExaoneMoeConfig",
        dict(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=24,
            num_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, num_hidden_layers=3,
            mlp_layer_types=["dense", "sparse", "sparse"], sliding_window=16,
        ),
    ),
    "cohere2_moe": (
        "Cohere2MoeConfig",
        dict(
            num_experts=8, num_experts_per_tok=2, intermediate_size=16, num_shared_experts=1,
            shared_expert_combination_strategy="sum", mlp_layer_types=["sparse", "sparse"], sliding_window=16,
        ),
    ),
    "lfm2_moe": (
        "Lfm2MoeConfig",
        dict(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=24, num_dense_layers=1,
            num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"], routed_scaling_factor=1.5,
        ),
    ),
    "granitemoeshared": (
        "GraniteMoeSharedConfig",
        dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16, shared_intermediate_size=24),
    ),
    "granitemoehybrid": (
        "GraniteMoeHybridConfig",
        dict(
            num_local_experts=8, num_experts_per_tok=2, intermediate_size=16, shared_intermediate_size=24,
            layer_types=["linear_attention", "full_attention"], mamba_n_heads=4, mamba_d_state=8, mamba_chunk_size=8,
            mamba_d_conv=4, mamba_expand=2,
        ),
    ),
    "mimo_v2_flash": (
        "MiMoV2FlashConfig",
        dict(
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=24,
            n_group=2, topk_group=1, routed_scaling_factor=1.5, num_hidden_layers=3, v_head_dim=8,
            sliding_window=16, mlp_layer_types=["dense", "sparse", "sparse"],
        ),
    ),
    "jamba": (
        "JambaConfig",
        dict(
            num_experts=8, num_experts_per_tok=2, intermediate_size=16, num_hidden_layers=4, expert_layer_period=2,
            expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1, use_mamba_kernels=False,
            mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
        ),
    ),
    "kimi_linear": (
        "KimiLinearConfig",
        dict(
            num_experts=8, num_experts_per_token=2, moe_intermediate_size=16, intermediate_size=24,
            num_shared_experts=1, num_expert_group=4, topk_group=2, routed_scaling_factor=2.0, num_hidden_layers=3,
            num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8, linear_head_dim=8, linear_num_heads=4, pad_token_id=0, bos_token_id=0, eos_token_id=0,
            mlp_layer_types=["dense", "sparse", "sparse"],
            layer_types=["linear_attention", "full_attention", "linear_attention"],
        ),
    ),
    "hunyuan_v1_moe": (
        "HunYuanMoEV1Config",
        dict(num_experts=8, moe_topk=2, intermediate_size=16, pad_token_id=0, bos_token_id=0, eos_token_id=0),
    ),
    "afmoe": (
        "AfmoeConfig",
        dict(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=24, num_shared_experts=2,
            num_dense_layers=1, num_hidden_layers=3, route_scale=1.5, global_attn_every_n_layers=2, sliding_window=16,
        ),
    ),
    "granitemoe_swa": (
        "GraniteMoeSWAConfig",
        dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16, sliding_window=16),
    ),
    "mellum": (
        "MellumConfig",
        dict(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=24, norm_topk_prob=False,
            mlp_layer_types=["sparse", "sparse"], sliding_window=16,
        ),
    ),
    "flint": (
        "FlintConfig",
        dict(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=24,
            shared_expert_intermediate_size=24, norm_topk_prob=True, sliding_window=16, mlp_only_layers=[],
            decoder_sparse_step=1,
        ),
    ),
    "hy_v3": (
        "HYV3Config",
        dict(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=24, num_shared_experts=1,
            router_scaling_factor=1.5, num_hidden_layers=3, mlp_layer_types=["dense", "sparse", "sparse"],
        ),
    ),
    "glm_moe_dsa": (
        "GlmMoeDsaConfig",
        dict(
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=24,
            n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=1.5, num_hidden_layers=3,
            kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4, index_topk=8, index_head_dim=16, index_n_heads=2, mlp_layer_types=["dense", "sparse", "sparse"],
        ),
    ),
    "laguna": (
        "LagunaConfig",
        dict(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=24,
            shared_expert_intermediate_size=24, moe_routed_scaling_factor=1.5, moe_router_logit_softcapping=2.0,
            mlp_layer_types=["sparse", "sparse"], sliding_window=16,
        ),
    ),
    "beam": (
        "BeamConfig",
        dict(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=24, n_group=4,
            topk_group=2, routed_scaling_factor=1.5, mlp_layer_types=["sparse", "sparse"], sliding_window=16,
        ),
    ),
    "kolibri1": (
        "Kolibri1Config",
        dict(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
            norm_topk_prob=True, sliding_window=16,
        ),
    ),
    "axk1": (
        "AXK1Config",
        dict(
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=24,
            n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5, num_hidden_layers=3,
            kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
            num_key_value_heads=4, mlp_layer_types=["dense", "sparse", "sparse"],
        ),
    ),
    "hy_v4": (
        "HYV4Config",
        dict(
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=24,
            n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5, num_hidden_layers=3,
            kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
            num_key_value_heads=4, index_topk=8, index_head_dim=16, index_n_heads=2, hc_mult=2, swiglu_limit=1.0,
            mlp_layer_types=["dense", "sparse", "sparse"], pad_token_id=0, bos_token_id=0, eos_token_id=0,
        ),
    ),
    "bailing_hybrid": (
        "BailingHybridConfig",
        dict(
            num_experts=8, num_experts_per_token=2, moe_intermediate_size=16, intermediate_size=24,
            num_shared_experts=1, num_expert_group=4, topk_group=2, routed_scaling_factor=2.5, num_hidden_layers=3,
            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
            mlp_layer_types=["dense", "sparse", "sparse"], pad_token_id=0, eos_token_id=0,
        ),
    ),
    "axk2": (
        "AXK2Config",
        dict(
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=24,
            n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5, num_hidden_layers=3,
            kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
            num_key_value_heads=4, index_topk=8, index_head_dim=16, index_n_heads=2, gated_norm_rank=4,
            mlp_layer_types=["dense", "sparse", "sparse"], pad_token_id=0, bos_token_id=0, eos_token_id=0,
        ),
    ),
    "aria_text": (
        "AriaTextConfig",
        dict(moe_num_experts=8, moe_topk=2, intermediate_size=16, moe_num_shared_experts=2, pad_token_id=0, eos_token_id=0),
    ),
    "minimax_m3_vl_text": (
        "MiniMaxM3VLTextConfig",
        dict(
            num_local_experts=8, num_experts_per_tok=2, intermediate_size=16, shared_intermediate_size=24,
            dense_intermediate_size=24, routed_scaling_factor=1.5, swiglu_limit=1.0, rotary_dim=4,
            index_n_heads=2, index_head_dim=8, index_block_size=4, index_topk_blocks=2, index_local_blocks=1,
            mlp_layer_types=["dense", "sparse", "sparse"], num_hidden_layers=3, pad_token_id=0, bos_token_id=0,
            eos_token_id=0,
        ),
    ),
}


# One family per storage layout / routing rule: what fast test runs cover when a check is costly per family.
CORE_TINY_FAMILIES = ("mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "phimoe", "llama4_text")


def tiny_families() -> list[str]:
    """model_type of every family with a tiny model that the installed transformers can build.

    With transformers older than the newest families (``scripts/test_oldest.sh``) those families are absent here
    (:func:`tiny_families_unavailable` names them): their checkpoints cannot be loaded by that transformers either.
    """
    return [model_type for model_type, (class_name, _) in _TINY_SPECS.items() if hasattr(transformers, class_name)]


def tiny_families_unavailable() -> list[str]:
    """model_type of the tiny families whose config class the installed transformers lacks."""
    return [model_type for model_type in _TINY_SPECS if model_type not in tiny_families()]


def tiny_config(model_type: str) -> transformers.PretrainedConfig:
    """The tiny config of ``model_type`` (a key of :func:`tiny_families`)."""
    class_name, fields = _TINY_SPECS[model_type]
    config_class = getattr(transformers, class_name)
    config = config_class(**{**_COMMON, **fields})
    config._experts_implementation = "eager"
    return config


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    """A randomly initialised tiny causal LM of ``model_type`` in eval mode, with eager experts."""
    return tiny_model_from_config(tiny_config(model_type), seed=seed, dtype=dtype)


def tiny_model_from_config(config: transformers.PretrainedConfig, seed: int = 0,
                           dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    """A randomly initialised causal LM from ``config`` (e.g. a :func:`tiny_config` with a field changed).

    Router weights, selection biases (DeepSeek, MiniMax-M2, Ernie, LFM2) and GPT-OSS's biases are drawn with enough spread that routing
    decisions are well separated (HF initialises some of them to zero, which would make every top-k a tie).
    """
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation="eager")
    return _spread_routing_weights(model).eval()


def tiny_qwen3_vl_moe(seed: int = 0, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    """A tiny random Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration``; a one-block vision tower) in eval mode.

    Not among :func:`tiny_families`: it is a vision-language model, loaded with ``AutoModelForImageTextToText``
    (transformers maps no causal LM class to it), so the causal-LM round trips of the family tests do not apply.
    """
    text = dict(
        _COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=24,
        decoder_sparse_step=1, mlp_only_layers=[],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2], "mrope_interleaved": True},
    )
    vision = dict(depth=1, hidden_size=32, num_heads=4, intermediate_size=32, out_hidden_size=32,
                  deepstack_visual_indexes=[0], patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=16)
    config = transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.AutoModelForImageTextToText.from_config(config, dtype=dtype, experts_implementation="eager")
    return _spread_routing_weights(model).eval()


def _spread_routing_weights(model: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    """Redraw routers, experts and selection biases with enough spread that routing decisions are well separated."""
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith(("router.weight", "gate.weight", "gate.wg.weight")) or "experts" in name:
                tensor.normal_(0.0, 0.3)
            elif name.endswith(("e_score_correction_bias", "expert_bias")):  # a parameter in Ernie-4.5-MoE
                tensor.normal_(0.0, 0.1)
            elif name.endswith(("router.bias", "shared_expert_gate.weight")):
                tensor.normal_(0.0, 0.3)
        for name, buffer in model.named_buffers():
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                buffer.normal_(0.0, 0.1)
    return model

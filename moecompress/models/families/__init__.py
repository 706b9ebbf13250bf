"""Family adapters: find the MoE blocks of a transformers model and build a :class:`MoEBlockView` for each.

An adapter is a small object per ``config.model_type``: which attribute of a decoder layer holds the MoE block,
which attributes of the block hold the router, experts and shared experts, and how the config spells routing.
Routing semantics are read from the config and the modules (``norm_topk_prob``, ``n_group``, ...), never
assumed from the family name alone. A new architecture is one adapter in a family module, registered here.

Layout: ``registry`` holds :class:`FamilyAdapter` and :data:`ADAPTERS`; ``shared_routing`` the routing helpers several
family modules use; one module per routing family defines its adapters (``softmax_topk``, ``deepseek``, ``gpt_oss``,
``phimoe``, ``granite``, ``llama4``, ``ernie``, ``minimax``, ``cohere2``, ``lfm2``, ``afmoe``, ``flint``, ``hunyuan``,
``laguna``, ``beam``, ``kolibri``, ``axk2``; each docstring names its model_types); ``lookup`` finds the adapter and
the MoE blocks of a model.
"""

from __future__ import annotations

from moecompress.models.families import (
    afmoe,
    axk2,
    beam,
    cohere2,
    deepseek,
    ernie,
    flint,
    gpt_oss,
    granite,
    hunyuan,
    kolibri,
    laguna,
    lfm2,
    llama4,
    minimax,
    phimoe,
    softmax_topk,
)
from moecompress.models.families.lookup import (
    adapter_for,
    decoder_layers,
    find_moe_blocks,
    minimum_experts,
    supported_families,
    text_config,
)
from moecompress.models.families.registry import ADAPTERS, FamilyAdapter, register_adapter

# In the order the families were added: ADAPTERS iterates in it (lookups are by model_type).
register_adapter(softmax_topk.MIXTRAL)
register_adapter(softmax_topk.QWEN2_MOE)
register_adapter(softmax_topk.QWEN3_MOE)
register_adapter(softmax_topk.QWEN3_5_MOE_TEXT, "qwen3_5_moe")
register_adapter(softmax_topk.QWEN3_NEXT)
register_adapter(softmax_topk.OLMOE)
register_adapter(deepseek.DEEPSEEK_V2)
register_adapter(deepseek.DEEPSEEK_V3)
register_adapter(gpt_oss.GPT_OSS)
register_adapter(phimoe.PHIMOE)
register_adapter(granite.GRANITEMOE)
register_adapter(deepseek.GLM4_MOE)
register_adapter(deepseek.DOTS1)
register_adapter(deepseek.SOLAR_OPEN)
register_adapter(softmax_topk.MINIMAX)
register_adapter(softmax_topk.FLEX_OLMO)
register_adapter(llama4.LLAMA4_TEXT, "llama4")
register_adapter(ernie.ERNIE4_5_MOE)
register_adapter(minimax.MINIMAX_M2)
register_adapter(deepseek.GLM4_MOE_LITE)
register_adapter(deepseek.DEEPSEEK_V32)
register_adapter(deepseek.EXAONE_MOE)
register_adapter(cohere2.COHERE2_MOE)
register_adapter(lfm2.LFM2_MOE)
register_adapter(granite.GRANITEMOESHARED)
register_adapter(granite.GRANITEMOEHYBRID)
register_adapter(deepseek.MIMO_V2_FLASH)
register_adapter(softmax_topk.JAMBA)
register_adapter(deepseek.KIMI_LINEAR)
register_adapter(softmax_topk.HUNYUAN_V1_MOE)
register_adapter(afmoe.AFMOE)
register_adapter(granite.GRANITEMOE_SWA)
register_adapter(softmax_topk.MELLUM)
register_adapter(flint.FLINT)
register_adapter(hunyuan.HY_V3)
register_adapter(deepseek.GLM_MOE_DSA)
register_adapter(laguna.LAGUNA)
register_adapter(beam.BEAM)
register_adapter(kolibri.KOLIBRI1)
register_adapter(deepseek.AXK1)
register_adapter(deepseek.HY_V4)
register_adapter(deepseek.BAILING_HYBRID)
register_adapter(axk2.AXK2)
register_adapter(granite.ARIA_TEXT, "aria")
register_adapter(minimax.MINIMAX_M3_VL_TEXT, "minimax_m3_vl")
register_adapter(softmax_topk.QWEN3_VL_MOE_TEXT, "qwen3_vl_moe")

__all__ = [
    "ADAPTERS",
    "FamilyAdapter",
    "adapter_for",
    "decoder_layers",
    "find_moe_blocks",
    "minimum_experts",
    "register_adapter",
    "supported_families",
    "text_config",
]

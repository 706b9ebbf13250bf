"""Reference semantics for expert edits, built on the *unedited* HF model, and checks of that reference itself.

Pruning expert ``e`` means: the router behaves as if ``e``'s logit were ``-inf``. This helper makes the original
HF router modules do exactly that while a ``with`` block runs: it intercepts the ``F.linear`` call of each router
while that router's forward runs (the family's own modeling code keeps doing the softmax / sigmoid / top-k / groups / sparsemixer math) and sets
the selection bias of pruned experts (DeepSeek-V3, MiniMax-M2, Ernie-4.5, ...) to ``-inf`` (a sigmoid score of 0 plus a finite bias could still be
selected otherwise).
"""

from __future__ import annotations

import contextlib
import sys
import types

import torch
import torch.nn.functional as torch_functional

from moecompress.models import find_moe_blocks


@contextlib.contextmanager
def routers_with_pruned_logits(model, pruned: dict[int, list[int]], group_state: dict[int, tuple[int, int]] | None = None):
    """Inside the block, router outputs ``pruned[layer]`` of ``model`` get logit ``-inf``.

    group_state: optional ``layer -> (num_group, topk_group)`` to set on DeepSeek routers meanwhile (the edited
    model turns group routing off when the kept experts no longer form the original groups).
    """
    views = {view.layer_index: view for view in find_moe_blocks(model)}
    active_mask: list[torch.Tensor] = []  # the mask of the router whose forward is running (at most one)
    original_linear = torch_functional.linear

    def masked_linear(input, weight, bias=None):
        out = original_linear(input, weight, bias)
        if active_mask and out.shape[-1] == active_mask[0].shape[0]:
            out = out + active_mask[0].to(out.dtype)
        return out

    def wrap_router_forward(router, mask):
        original_forward = router.forward

        def forward(*args, **kwargs):
            active_mask.append(mask)
            try:
                return original_forward(*args, **kwargs)
            finally:
                active_mask.pop()

        return forward

    saved_state = []
    for layer, expert_ids in pruned.items():
        router = views[layer].router
        mask = torch.zeros(views[layer].router_weight.shape[0])
        mask[list(expert_ids)] = float("-inf")
        router.forward = wrap_router_forward(router, mask)
        saved_state.append((router, "forward", None))
        bias = views[layer].selection_bias  # a live [E] view, wherever the family keeps it
        if bias is not None:
            saved_state.append((bias, "selection_bias", bias.clone()))
            bias[list(expert_ids)] = float("-inf")
        if group_state and layer in group_state:
            saved_state.append((router, "num_group", router.num_group))
            saved_state.append((router, "topk_group", router.topk_group))
            router.num_group, router.topk_group = group_state[layer]
    proxy = types.SimpleNamespace(
        **{name: getattr(torch_functional, name) for name in dir(torch_functional) if not name.startswith("__")}
    )
    proxy.linear = masked_linear
    patched_modules = {sys.modules[type(views[layer].router).__module__] for layer in pruned}
    patched_modules.add(sys.modules["torch.nn.modules.linear"])  # PhiMoE's router is an nn.Linear subclass
    # Routers call ``F.linear`` (most) or ``nn.functional.linear`` (Aria): patch whichever name the module uses.
    nn_proxy = types.SimpleNamespace(**{name: getattr(torch.nn, name) for name in dir(torch.nn) if not name.startswith("__")})
    nn_proxy.functional = proxy
    saved = []
    for module in patched_modules:
        for attr, replacement in (("F", proxy), ("nn", nn_proxy)):
            if hasattr(module, attr):
                saved.append((module, attr, getattr(module, attr)))
                setattr(module, attr, replacement)
    try:
        yield
    finally:
        for module, attr, original in saved:
            setattr(module, attr, original)
        for router, name, value in saved_state:
            if name == "forward":
                del router.forward
            elif name == "selection_bias":
                router.copy_(value)  # (the live bias tensor, "selection_bias", saved copy)
            else:
                setattr(router, name, value)


# ----- checks of the reference itself ---------------------------------------------------------------------------------


def _router_choices(model, tokens) -> dict[int, torch.Tensor]:
    """Per MoE layer, the expert ids the HF routers chose for ``tokens`` ``[T*k]``."""
    choices, handles = {}, []
    for view in find_moe_blocks(model):
        def hook(module, args, output, layer=view.layer_index):
            if len(output) == 2:  # Llama4: dense sigmoid scores, exactly 0 off the top-k
                choices[layer] = torch.nonzero(output[0] > 0)[:, 1]
            else:
                choices[layer] = output[2].reshape(-1)
        handles.append(view.router.register_forward_hook(hook))
    with torch.no_grad():
        model(tokens)
    for handle in handles:
        handle.remove()
    return choices


def test_reference_never_routes_to_pruned_experts_and_is_a_no_op_when_nothing_is_pruned():
    from moecompress.models.tiny import tiny_families, tiny_model

    tokens = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(0))
    for model_type in tiny_families():
        model = tiny_model(model_type)
        layers = [view.layer_index for view in find_moe_blocks(model)]
        with torch.no_grad():
            plain = model(tokens).logits
        with routers_with_pruned_logits(model, {layer: [] for layer in layers}), torch.no_grad():
            unmasked = model(tokens).logits
        torch.testing.assert_close(unmasked, plain, rtol=0, atol=0)
        pruned = {layer: [1, 4, 6] for layer in layers}
        group_off = {v.layer_index: (1, 1) for v in find_moe_blocks(model) if hasattr(v.router, "num_group")}
        with routers_with_pruned_logits(model, pruned, group_off):
            choices = _router_choices(model, tokens)
        for layer, chosen in choices.items():
            assert not set(chosen.tolist()) & {1, 4, 6}, (model_type, layer)
        with torch.no_grad():  # and everything is restored afterwards
            torch.testing.assert_close(model(tokens).logits, plain, rtol=0, atol=0)

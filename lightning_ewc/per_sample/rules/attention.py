"""nn.MultiheadAttention: the q, k and v projections (blocks of rows of ``in_proj_weight``, or ``q/k/v_proj_weight``
when kdim/vdim differ from embed_dim, and of ``in_proj_bias``) and out_proj, all on the Linear closed form.

torch applies these weights through ``F.linear`` inside ``F.multi_head_attention_forward``, where no module hook sees
them, on sequence-first tensors, and out_proj on a ``[L·N, E]`` matrix whose rows mix samples and positions. So during
the per-sample pass the module runs ``attention_forward`` instead: the same computation on batch-first tensors, whose
q, k and v projection outputs are handed to one tap each (``ProjectionRule``: a Linear whose weight and bias are blocks
of rows), and whose output projection is a call of the ``out_proj`` module, tapped like any Linear. The self-check
compares the logits of this forward with the model's own, and the taps' summed gradients with autograd's, on the first
batch. Calls it does not cover (unbatched input, attention dropout in training mode, a mask of another type) run
torch's forward, whose parameters the self-check then sends to the exact fallback; ``add_bias_kv`` and
``add_zero_attn`` modules are not tapped at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ewc.per_sample.rules.base import LayerRule, Part
from lightning_ewc.per_sample.rules.linear import LinearRule

Record = Callable[[Tensor, Tensor], Tensor]  # a tap's record(input, output) -> the output to use downstream


class ProjectionRule(LinearRule):
    """One of q, k, v: a Linear whose weight is rows of the module's projection weight and whose bias is rows of
    ``in_proj_bias``. Never matched on its own: ``AttentionRule.parts`` makes it."""

    route = "attention"

    def applies(self, module: nn.Module) -> bool:
        return False

    def has_bias(self, module: nn.Module) -> bool:
        return module.in_proj_bias is not None


class AttentionRule(LayerRule):
    route = "attention"

    def applies(self, module: nn.Module) -> bool:
        return (
            isinstance(module, nn.MultiheadAttention)
            and type(module).forward is nn.MultiheadAttention.forward
            and module.bias_k is None
            and module.bias_v is None
            and not module.add_zero_attn
        )

    def parts(self, module: nn.Module) -> list[Part]:
        e = module.embed_dim
        rows = {"q": slice(0, e), "k": slice(e, 2 * e), "v": slice(2 * e, 3 * e)}
        projection = ProjectionRule()
        return [
            Part(
                label,
                projection,
                {
                    "weight": ("in_proj_weight", rows[label])
                    if module._qkv_same_embed_dim
                    else (f"{label}_proj_weight", None),
                    "bias": ("in_proj_bias", rows[label]),
                },
            )
            for label in ("q", "k", "v")
        ]

    def forward_override(self, module: nn.Module, records: dict[str, Record]) -> Callable[..., tuple]:
        """The forward the module runs during the per-sample pass; ``records`` maps "q", "k", "v" to the taps'
        ``record`` (a part whose parameters left the taps has none)."""

        def forward(
            query: Tensor,
            key: Tensor,
            value: Tensor,
            key_padding_mask: Tensor | None = None,
            need_weights: bool = True,
            attn_mask: Tensor | None = None,
            average_attn_weights: bool = True,
            is_causal: bool = False,
        ) -> tuple[Tensor, Tensor | None]:
            if not _covered(module, query, key, value, key_padding_mask, attn_mask, is_causal):
                return type(module).forward(
                    module,
                    query,
                    key,
                    value,
                    key_padding_mask,
                    need_weights,
                    attn_mask,
                    average_attn_weights,
                    is_causal,
                )
            return attention_forward(
                module, records, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                is_causal,
            )  # fmt: skip

        return forward


def bypassed_submodules(module: nn.Module, rule: LayerRule | None) -> list[nn.Module]:
    """Submodules whose parameters ``module`` uses without calling them: MultiheadAttention's out_proj, unless
    ``attention_forward`` runs it as a module call."""
    if isinstance(module, nn.MultiheadAttention) and not isinstance(rule, AttentionRule):
        return [module.out_proj]
    return []


def _covered(module, query, key, value, key_padding_mask, attn_mask, is_causal) -> bool:
    """Whether ``attention_forward`` computes this call as torch would; otherwise torch's own forward runs (and
    raises its own errors for malformed calls)."""
    tensors = (query, key, value)
    if any(t.dim() != 3 or t.is_nested for t in tensors) or torch.overrides.has_torch_function(tensors):
        return False
    if module.training and module.dropout > 0:
        return False
    if is_causal and attn_mask is None:
        return False
    n_dim = 0 if module.batch_first else 1
    n, tgt, src = query.shape[n_dim], query.shape[1 - n_dim], key.shape[1 - n_dim]
    if key.shape[:2] != value.shape[:2] or key.shape[n_dim] != n:
        return False
    if module._qkv_same_embed_dim and key.shape != value.shape:
        return False
    for mask in (key_padding_mask, attn_mask):
        if mask is not None and mask.dtype != torch.bool and not torch.is_floating_point(mask):
            return False
    if key_padding_mask is not None and key_padding_mask.shape != (n, src):
        return False
    if attn_mask is not None and attn_mask.shape not in ((tgt, src), (n * module.num_heads, tgt, src)):
        return False
    return True


def attention_forward(
    module: nn.MultiheadAttention,
    records: dict[str, Record],
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None,
    need_weights: bool,
    attn_mask: Tensor | None,
    average_attn_weights: bool,
    is_causal: bool,
) -> tuple[Tensor, Tensor | None]:
    """``F.multi_head_attention_forward`` for batched input without bias_k/bias_v, zero attention or dropout, on
    batch-first tensors: the same operations (explicit softmax when the weights are returned, scaled dot-product
    attention otherwise), with the projections observable."""
    heads, e = module.num_heads, module.embed_dim
    self_attention, shared_kv = query is key and key is value, key is value
    if not module.batch_first:
        query = query.transpose(0, 1)
        key = query if self_attention else key.transpose(0, 1)
        value = key if shared_kv else value.transpose(0, 1)
    q, k, v = _projections(module, records, query, key, value, self_attention, shared_kv)
    n, tgt, src = q.shape[0], q.shape[1], k.shape[1]
    mask = _additive_mask(attn_mask, key_padding_mask, n, heads, tgt, src, q.dtype)
    q, k, v = (t.unflatten(-1, (heads, e // heads)).transpose(1, 2) for t in (q, k, v))  # [N, H, L, E/H]
    if need_weights:
        scores = (q * math.sqrt(1.0 / q.shape[-1])) @ k.transpose(-2, -1)
        weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
        out = weights @ v
        weights = weights.mean(dim=1) if average_attn_weights else weights
    else:
        causal = is_causal and key_padding_mask is None  # torch then passes the causal hint instead of the mask
        out = F.scaled_dot_product_attention(q, k, v, None if causal else mask, 0.0, causal)
        weights = None
    out = module.out_proj(out.transpose(1, 2).reshape(n, tgt, e))  # a module call: the Linear tap sees it
    return (out if module.batch_first else out.transpose(0, 1).contiguous()), weights


def _projections(module, records, query, key, value, self_attention, shared_kv) -> tuple[Tensor, Tensor, Tensor]:
    e, bias = module.embed_dim, module.in_proj_bias
    b = (None, None, None) if bias is None else bias.chunk(3)
    if not module._qkv_same_embed_dim:
        weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        outs = [F.linear(x, w, bb) for x, w, bb in zip((query, key, value), weights, b)]
    elif self_attention:  # one product for all three, as torch does
        outs = list(F.linear(query, module.in_proj_weight, bias).chunk(3, dim=-1))
    elif shared_kv:
        w = module.in_proj_weight
        kv = F.linear(key, w[e:], None if bias is None else bias[e:])
        outs = [F.linear(query, w[:e], b[0]), *kv.chunk(2, dim=-1)]
    else:
        outs = [F.linear(x, w, bb) for x, w, bb in zip((query, key, value), module.in_proj_weight.chunk(3), b)]
    inputs = (query, key, value)
    return tuple(records[label](x, out) if label in records else out for label, x, out in zip("qkv", inputs, outs))  # type: ignore[return-value]


def _additive_mask(
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, n: int, heads: int, tgt: int, src: int, dtype
) -> Tensor | None:
    """The masks as one additive float mask broadcastable to ``[N, H, L, S]`` (True: not attended, −inf)."""
    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, dtype)
        mask = mask.view(1, 1, tgt, src) if mask.dim() == 2 else mask.view(n, heads, tgt, src)
    if key_padding_mask is not None:
        padding = _additive(key_padding_mask, dtype).view(n, 1, 1, src)
        mask = padding if mask is None else mask + padding
    return mask


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    return mask

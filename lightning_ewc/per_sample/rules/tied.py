"""A parameter that several tapped modules own (an LM head whose weight is the input embedding's, ``head.weight =
emb.weight``): a sample's gradient is the sum of the modules' contributions, added before it is squared.

Two routes, both exact:

- An Embedding and a Linear (the tied LM head): with ``D_n`` the Linear's per-sample gradient and ``S_n`` the
  Embedding's, nonzero only on the rows ``v`` that sample ``n`` looked up,
  ``Σ_n r(D_n + S_n) = Σ_n r(D_n) + Σ_(n, v looked up) [r(D_n[v] + S_n[v]) − r(D_n[v])]``: the Linear's own sum plus
  a correction on the looked-up rows, for which only those rows of ``D_n`` are formed. For the square the correction
  is ``2·D·S + S²``, which does not subtract two large squares. No ``[N, V, D]`` tensor.
- Any other set of rules: each chunk of samples' per-sample gradients materialised per module, added, reduced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_ewc.per_sample import limits
from lightning_ewc.per_sample.rules.base import InputAndGrad, LayerRule
from lightning_ewc.per_sample.rules.embedding import EmbeddingRule, grouped_rows
from lightning_ewc.per_sample.rules.linear import LinearRule
from lightning_ewc.per_sample.sums import Reduction, reduce_per_sample


@dataclass
class Use:
    """One module's use of the shared parameter in one forward: its rule, the parameter's local name there, and the
    module's calls (input and output gradient, samples first)."""

    rule: LayerRule
    module: nn.Module
    local: str
    calls: list[InputAndGrad]


def tied_sums(uses: list[Use], shape: torch.Size, reduction: Reduction) -> Tensor:
    """``Σ_n r(Σ_uses per-sample gradient)`` of the shared parameter, shaped ``shape``."""
    kinds = {type(use.rule): use for use in uses}
    if len(uses) == 2 and set(kinds) == {EmbeddingRule, LinearRule}:
        return _embedding_and_linear(kinds[EmbeddingRule], kinds[LinearRule], reduction)
    return _materialised(uses, shape, reduction)


def _materialised(uses: list[Use], shape: torch.Size, reduction: Reduction) -> Tensor:
    merged = [(use, use.rule.merge_calls(use.calls)) for use in uses]
    n = merged[0][1][0][0].shape[0]
    chunk = max(1, limits.MAX_BLOCK_ELEMENTS // max(shape.numel(), 1))
    total = None
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        per_sample = sum(use.rule.summed_per_sample(use.module, calls, rows)[use.local] for use, calls in merged)
        part = reduce_per_sample(per_sample, reduction).sum(0)
        total = part if total is None else total + part
    return total


def _embedding_and_linear(embedding: Use, linear: Use, reduction: Reduction) -> Tensor:
    ((a, g),) = linear.rule.merge_calls(linear.calls)
    n = a.shape[0]
    a3, g3 = a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])  # [N, L, D], [N, L, V]
    if a3.shape[1] == 1:  # one position: Σ_n r(g_n a_nᵀ) = r(g)ᵀ r(a)
        total = reduce_per_sample(g3[:, 0], reduction).t().mm(reduce_per_sample(a3[:, 0], reduction))
    else:
        total = sum(sums["weight"] for sums in linear.rule.reduced_sums(linear.module, [(a3, g3)], reduction))
    ((idx, g_emb),) = embedding.rule.merge_calls(embedding.calls)
    vocab = embedding.module.weight.shape[0]
    keys, rows = grouped_rows(embedding.module, idx, g_emb)  # S_n[v] for every (n, v) looked up
    samples, tokens = keys // vocab, keys % vocab
    chunk = max(1, limits.MAX_BLOCK_ELEMENTS // max(a3[0].numel(), 1))
    for start in range(0, len(keys), chunk):
        part = slice(start, start + chunk)
        s, v = samples[part], tokens[part]
        d = torch.bmm(g3[s, :, v].unsqueeze(1), a3[s]).squeeze(1)  # D_n[v] = Σ_l g_nl[v] a_nl
        e = rows[part].to(d.dtype)
        correction = 2 * d * e + e.square() if reduction == "sq" else (d + e).abs() - d.abs()
        total.index_add_(0, v, correction.to(total.dtype))
    return total

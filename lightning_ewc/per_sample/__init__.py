"""Sums over samples of squared (or absolute) per-sample gradients, without a loop over samples.

Every importance measure here is ``Σ_n r(∂ φ_n / ∂θ)`` where ``φ_n = v_n · z_n(θ)`` is a sample's output ``z_n``
(logits) contracted with a fixed vector ``v_n`` (for the Fisher ``v_n = e_y − p_n``, the gradient of log p(y|x)
with respect to the logits) and ``r`` is the square or the absolute value. Autograd only ever gives the *sum* over
samples of gradients, and squaring a sum is not a sum of squares, so we need per-sample gradients. Three routes,
chosen per parameter, all exact:

1. **Taps** on layers whose per-sample gradient is a known function of the layer's input ``a`` and the gradient
   ``g`` at its output (Linear and its subclasses that keep its forward, transformers' Conv1D, Conv1d/2d,
   BatchNorm in eval mode, LayerNorm, RMSNorm, GroupNorm, Embedding, MultiheadAttention's projections). One forward
   and one backward *to the layer outputs* per vector ``v`` gives every ``g``. For a Linear layer called once on
   2-D input the per-sample gradient is the outer product ``g_n a_nᵀ``, so ``Σ_n (g_n a_nᵀ)² = (g²)ᵀ(a²)`` and
   ``Σ_n |g_n a_nᵀ| = |g|ᵀ|a|``: one matrix product, nothing materialised; on a sequence, ``Σ_l g_nl a_nlᵀ`` is
   materialised a bounded chunk of samples at a time. A conv whose output goes straight into an eval-mode BatchNorm
   gets both layers' gradients from the BatchNorm's output gradient, so the backward stops there
   (``rules/conv_batchnorm.py``). MultiheadAttention runs a forward of its own during the pass, whose q, k and v
   projections are observable (``rules/attention.py``). A weight several tapped modules own (an LM head tied to
   the embedding) adds their per-sample contributions before the square (``rules/tied.py``).
2. **vmap**: ``torch.func.vmap(grad(...))`` over the samples, for every other parameter.
3. **loop**: one sample at a time, when vmap cannot trace the model (data-dependent Python, ``.item()``, ...).

The samples need not be along dim 0 inside the model: a first-batch probe finds, for every tapped call, the dim that
grows with the number of samples (dim 1 of a sequence-first Transformer's ``[T, N, D]``), or finds none (a position
embedding looked up once for the batch, whose output is then expanded to one copy per sample). The first-batch
self-check then compares the tapped forward's logits with the model's, checks that samples stay apart, and compares
the taps' summed gradient with autograd's batch gradient, so a tapped weight that is also used outside its module
call (tied weights through ``F.linear``) moves to the exact fallback instead of being silently wrong, and a conv whose
output also feeds something besides its BatchNorm is computed on its own.

Where each part lives:

- ``accumulator.py``: the engine (``PerSampleAccumulator``): taps, the forward, one backward per vector, the sums.
- ``rules/``: one module per layer family, each a ``LayerRule`` (``rules/base.py``); ``rules/__init__.py`` lists
  them in the order they are tried. ``rules/conv_batchnorm.py`` is the conv → eval-BatchNorm fusion,
  ``rules/tied.py`` the shared weights.
- ``fallback.py``: the vmap and loop routes. ``self_check.py``: the first-batch checks. ``taps.py``: the hooks.
- ``batches.py``, ``sums.py``, ``limits.py``: batch slicing, the reduction and the finite check, memory bounds.
"""

from lightning_ewc.per_sample.accumulator import OutputGrads, PerSampleAccumulator, PerSampleReport
from lightning_ewc.per_sample.batches import Batch, batch_size_of, slice_batch
from lightning_ewc.per_sample.sums import Reduction, finite_or_raise

__all__ = [
    "Batch",
    "OutputGrads",
    "PerSampleAccumulator",
    "PerSampleReport",
    "Reduction",
    "batch_size_of",
    "finite_or_raise",
    "slice_batch",
]

"""The empirical Fisher of a small Transformer encoder classifier: MultiheadAttention on its closed-form route against
the vmap route it took before (every attention weight through torch.func.vmap), and against one plain
forward+backward over the same samples.

Model: token and learned position embeddings, 2 nn.TransformerEncoderLayer (d = 64, 4 heads, feed-forward 128,
batch first), mean-pooled into a 10-way Linear head; T = 16 random tokens, N = 256 in batches of 128. No target: the
figures are for bench/README's "Why the per-sample routes are what they are". Run: python bench/transformer_routes.py
[--quick] [--device cuda] [--threads 1]
"""

from __future__ import annotations

from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from _common import machine, parser, timed_interleaved
from lightning_ewc.fisher import accumulate_importance
from lightning_ewc.per_sample.rules.attention import AttentionRule

CLASSES, VOCAB = 10, 1000


class EncoderClassifier(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2, length: int = 16):
        super().__init__()
        self.emb, self.pos = nn.Embedding(VOCAB, dim), nn.Embedding(length, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, tokens):
        h = self.emb(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        return self.head(self.encoder(h).mean(1))


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a shared host)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n, length, batch = (32, 8, 16) if args.quick else (256, 16, 128)
    repeats = args.repeats or (2 if args.quick else 7)
    torch.manual_seed(0)
    model = EncoderClassifier(length=length).to(args.device)
    tokens = torch.randint(0, VOCAB, (n, length), device=args.device)
    labels = torch.randint(0, CLASSES, (n,), device=args.device)
    batches = [(tokens[i : i + batch], labels[i : i + batch]) for i in range(0, n, batch)]

    def plain():
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    def routes():
        return accumulate_importance(model, batches, "empirical")

    def vmap_attention():
        with mock.patch.object(AttentionRule, "applies", lambda self, module: False):
            return accumulate_importance(model, batches, "empirical")

    fast, slow = routes(), vmap_attention()
    assert "vmap" not in fast.routes.values() and slow.routes["encoder.layers.0.self_attn.in_proj_weight"] == "vmap"
    for name, s in fast.sums.items():
        scale = float(slow.sums[name].abs().max())
        assert float((s - slow.sums[name]).abs().max()) <= 1e-3 * scale + 1e-12, name
    times = timed_interleaved({"plain": plain, "routes": routes, "vmap": vmap_attention}, repeats, args.device)
    print(f"{machine(args.device)}, torch {torch.__version__}, N={n}, T={length}, batch {batch}, {repeats} repeats")
    print(f"plain forward+backward            {times['plain'] * 1e3:8.1f} ms")
    print(
        f"empirical, attention on its route {times['routes'] * 1e3:8.1f} ms   {times['routes'] / times['plain']:.2f}x plain"
    )
    print(
        f"empirical, attention through vmap {times['vmap'] * 1e3:8.1f} ms   {times['vmap'] / times['plain']:.2f}x plain"
    )
    print(f"vmap / route                      {times['vmap'] / times['routes']:.2f}")


if __name__ == "__main__":
    main()

"""What each rank holds under FSDP2 (ModelParallelStrategy + fully_shard): the model's shard, EWC's state, and the
memory the Fisher pass adds, for 1 and 2 CPU ranks (gloo). Bytes are counted, not timed, so the machine may be busy.

Per rank it prints the model's local parameter bytes (and the full model's), ``EWCCallback.num_bytes()`` (target:
2 × the local shard), and, for the Fisher pass of ``EWCCallback.consolidate``, the most bytes of full-size importance
sums the rank held at once: the accumulator adds up the sizes of the full-size tensors it allocates for them and
takes off those it drops once reduced to the shards (``ImportanceSums.peak_full_bytes``). The collective that reduces
a module's sums sends a copy of them (padded to equal chunks), for the time of that collective only.

The process's peak allocation over the pass is not printed: on a CPU, torch has no allocator statistics, and
torch.profiler's allocation records (``profile_memory=True``) miss the frees of FSDP2's gathered layers (it releases
their storage by resizing it), so its running total only grows. On a GPU, torch.cuda.max_memory_allocated around
``consolidate`` gives it.

Run: python bench/sharded_memory.py  (it starts itself again with 1 and with 2 ranks)
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SAMPLES, BATCH = 2048, 128


def worker(ranks: int) -> None:
    import lightning.pytorch as L
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor
    from torch.utils.data import DataLoader

    from _common import mnist_batches
    from lightning_ewc import EWCCallback, EWCMixin

    class MLP(EWCMixin, L.LightningModule):
        ewc_warn_without_callback = False  # EWC consolidates by hand in Measure, after training

        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(),
                                     nn.Linear(400, 10))

        def configure_model(self):
            if self.device_mesh is None or isinstance(self, FSDPModule):
                return
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=self.device_mesh["data_parallel"])
            fully_shard(self, mesh=self.device_mesh["data_parallel"])

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    class Measure(L.Callback):
        def on_train_end(self, trainer, pl_module):
            params = dict(pl_module.named_parameters())
            local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
                        for p in params.values())
            full = sum(p.numel() * p.element_size() for p in params.values())
            ewc.consolidate(pl_module, trainer=trainer)
            largest = max(sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
                          for m in pl_module.modules())
            print(f"ranks={ranks} rank={trainer.global_rank} model_local={local} model_full={full} "
                  f"largest_layer={largest} ewc_state={ewc.num_bytes()} "
                  f"full_sums={ewc.last_estimate.peak_full_bytes}", flush=True)

    torch.set_num_threads(1)
    batches = mnist_batches(SAMPLES, BATCH, "cpu")
    data = torch.utils.data.TensorDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    fisher_data = DataLoader(data, batch_size=BATCH)
    ewc = EWCCallback(fisher="exact", fisher_batch_size=BATCH, fisher_dataloader=fisher_data)
    trainer = L.Trainer(accelerator="cpu", devices=ranks,
                        strategy=ModelParallelStrategy(data_parallel_size=ranks, tensor_parallel_size=1),
                        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Measure()])
    trainer.fit(MLP(), DataLoader(data, batch_size=BATCH))


def mib(fields: dict, key: str) -> str:
    return f"{int(fields[key]) / 2**20:.2f} MiB"


def main() -> None:
    if len(sys.argv) > 1:
        worker(int(sys.argv[1]))
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, gloo; MLP 784-400-400-10, exact Fisher on {SAMPLES} "
          f"MNIST images in batches of {BATCH} (shared by the ranks)")
    for ranks in (1, 2):
        env = dict(os.environ)
        env.pop("LOCAL_RANK", None)
        out = subprocess.run([sys.executable, __file__, str(ranks)], env=env, capture_output=True, text=True,
                             check=False)
        lines = [line[line.index("ranks="):] for line in out.stdout.splitlines() if "ranks=" in line]
        if out.returncode or not lines:
            print(out.stdout[-2000:], out.stderr[-4000:])
            raise SystemExit(f"{ranks} ranks failed")
        for line in sorted(lines):
            f = dict(kv.split("=") for kv in line.split())
            print(f"{f['ranks']} rank(s), rank {f['rank']}: model shard {mib(f, 'model_local')} of "
                  f"{mib(f, 'model_full')}; EWC state {mib(f, 'ewc_state')} "
                  f"({int(f['ewc_state']) / int(f['model_local']):.2f}x the shard); Fisher pass: full-size sums at "
                  f"most {mib(f, 'full_sums')} (the largest layer's parameters: {mib(f, 'largest_layer')})")


if __name__ == "__main__":
    main()

"""What each rank holds under FSDP2 (ModelParallelStrategy + fully_shard): the model's shard, EWC's state, and the
memory the Fisher pass adds, for 1 and 2 CPU ranks (gloo). Bytes are counted, not timed, so the machine may be busy.

Per rank it prints the model's local parameter bytes, EWCCallback.num_bytes() (target: 2 × the local shard) and the
full-size importance sums the Fisher pass holds until its reduce-scatter (one float32 copy of the parameters: the gap
to the issue's "one layer at a time"). On a GPU, torch.cuda.max_memory_allocated over the pass would add the measured
peak; a CPU has no allocator statistics, and the process's peak RSS is set by training, not by the pass.

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


def worker(ranks: int) -> None:
    import lightning.pytorch as L
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor
    from torch.utils.data import DataLoader

    from _common import mnist_batches
    from lightning_ewc import EWCCallback, EWCMixin

    class MLP(EWCMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(),
                                     nn.Linear(400, 10))

        def configure_model(self):
            if self._device_mesh is None or isinstance(self, FSDPModule):
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
        def on_fit_end(self, trainer, pl_module):
            local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
                        for p in pl_module.parameters())
            full = sum(p.numel() * p.element_size() for p in pl_module.parameters())
            print(f"ranks={ranks} rank={trainer.global_rank} model_local={local} model_full={full} "
                  f"ewc_state={ewc.num_bytes()} pass_sums={full}", flush=True)

    torch.set_num_threads(1)
    batches = mnist_batches(2048, 128, "cpu")
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    data = torch.utils.data.TensorDataset(x, y)
    ewc = EWCCallback(fisher="exact", fisher_batch_size=128)
    measure = Measure()
    trainer = L.Trainer(accelerator="cpu", devices=ranks,
                        strategy=ModelParallelStrategy(data_parallel_size=ranks, tensor_parallel_size=1),
                        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[measure, ewc])
    trainer.fit(MLP(), DataLoader(data, batch_size=128))


def main() -> None:
    if len(sys.argv) > 1:
        worker(int(sys.argv[1]))
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, gloo")
    for ranks in (1, 2):
        env = dict(os.environ)
        env.pop("LOCAL_RANK", None)
        out = subprocess.run([sys.executable, __file__, str(ranks)], env=env, capture_output=True, text=True)
        lines = [line[line.index("ranks="):] for line in out.stdout.splitlines() if "ranks=" in line]
        if out.returncode or not lines:
            print(out.stdout[-2000:], out.stderr[-4000:])
            raise SystemExit(f"{ranks} ranks failed")
        for line in sorted(lines):
            fields = dict(kv.split("=") for kv in line.split())
            print(f"{fields['ranks']} rank(s), rank {fields['rank']}: model shard {int(fields['model_local']) / 2**20:.2f} "
                  f"MiB of {int(fields['model_full']) / 2**20:.2f}; EWC state {int(fields['ewc_state']) / 2**20:.2f} MiB "
                  f"({int(fields['ewc_state']) / int(fields['model_local']):.2f}x the shard); pass: full-size sums "
                  f"{int(fields['pass_sums']) / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()

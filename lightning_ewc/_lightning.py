"""One place that picks the Lightning namespace the package subclasses.

``lightning`` (the unified package) is a dependency, so ``lightning.pytorch`` is the normal case; the standalone
``pytorch_lightning`` package works too, because the callback only relies on hook names and the mixin only on
``self.log``/``self.trainer``, which both namespaces share (tested with both Trainers).
"""

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.utilities import move_data_to_device, rank_zero_info, rank_zero_warn
except ImportError:  # pragma: no cover - exercised only where `lightning` is absent
    from pytorch_lightning import Callback, LightningModule, Trainer
    from pytorch_lightning.utilities import move_data_to_device, rank_zero_info, rank_zero_warn

__all__ = ["Callback", "LightningModule", "Trainer", "move_data_to_device", "rank_zero_info", "rank_zero_warn"]

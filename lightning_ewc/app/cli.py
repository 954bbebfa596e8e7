"""The ``lightning-ewc`` command: a thin Hydra entry point over :func:`lightning_ewc.app.runner.run`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="pkg://lightning_ewc.conf", config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from lightning_ewc.app.runner import run

    # Returned for sweepers that optimise a metric (Optuna): the final average accuracy.
    return run(cfg)["avg_acc"]


def main() -> None:
    _main()

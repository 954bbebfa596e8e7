"""Elastic Weight Consolidation for PyTorch Lightning: add a callback, keep your training_step.

Library: :class:`EWCCallback`, :class:`EWCMixin`, :func:`estimate_fisher` and the pure functions in
:mod:`lightning_ewc.consolidation` and :mod:`lightning_ewc.fisher`.
"""

from lightning_ewc.callback import EWCCallback
from lightning_ewc.consolidation import ConsolidatedState
from lightning_ewc.fisher import FISHER_ESTIMATORS, estimate_fisher
from lightning_ewc.importance import IMPORTANCES
from lightning_ewc.mixin import EWCMixin

__all__ = ["EWCCallback", "EWCMixin", "estimate_fisher", "ConsolidatedState", "FISHER_ESTIMATORS", "IMPORTANCES"]
__version__ = "0.1.0"

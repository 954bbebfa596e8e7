"""A counter of structural changes to any ``nn.Module``: a parameter or submodule registered (assigned) anywhere.

The penalty caches, between training steps, which parameter tensors it acts on. Seeing whether one was replaced (a
new head of another size) by listing the module's parameters would walk every submodule in Python at every step;
torch's global registration hooks see every replacement made through the public API (attribute assignment,
``register_parameter``/``register_module``, ``ModuleList`` item assignment, ``load_state_dict(assign=True)``) for the
price of an integer increment, so the cache is keyed on this counter (and checks the shapes of what it holds).
"""

from __future__ import annotations

from torch.nn.modules.module import register_module_module_registration_hook, register_module_parameter_registration_hook

_generation = 0


def structure_generation() -> int:
    """Changes whenever a parameter or a submodule is registered on any module in this process."""
    return _generation


def _bump(*_) -> None:
    global _generation
    _generation += 1


register_module_parameter_registration_hook(_bump)
register_module_module_registration_hook(_bump)

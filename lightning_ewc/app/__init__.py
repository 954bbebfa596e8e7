"""The continual-learning app on top of the library: task streams, models, methods, the per-task runner, metrics,
pictures and the Hydra entry point. Nothing in the library (callback, mixin, Fisher, consolidation) imports from here.

The app needs more than the library: ``pip install "lightning-ewc[app]"``. Importing it without those packages
raises an ImportError that says so, rather than a bare "No module named 'hydra'" from somewhere inside.
"""

import importlib.util

# (module the app imports, the distribution that provides it)
APP_REQUIREMENTS = (("hydra", "hydra-core"), ("omegaconf", "hydra-core"), ("matplotlib", "matplotlib"),
                    ("sklearn", "scikit-learn"))
INSTALL_HINT = 'pip install "lightning-ewc[app]"'


def missing_requirements() -> list[str]:
    """The distributions of :data:`APP_REQUIREMENTS` that cannot be imported here, each named once."""
    missing: list[str] = []
    for module, distribution in APP_REQUIREMENTS:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a finder that refuses the name, or a module left half-imported
            found = False
        if not found and distribution not in missing:
            missing.append(distribution)
    return missing


if _missing := missing_requirements():
    # name= lets the entry point (lightning_ewc.__main__) tell this error from any other failed import.
    raise ImportError(
        f"the lightning-ewc app (the lightning-ewc command, lightning_ewc.app) needs {', '.join(_missing)}, which "
        f"{'is' if len(_missing) == 1 else 'are'} not installed; install the app's extra: {INSTALL_HINT} "
        "(the library itself, lightning_ewc.EWCCallback and friends, works without them)",
        name=__name__,
    )

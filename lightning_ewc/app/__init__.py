"""The continual-learning app on top of the library: task streams, models, methods, the per-task runner, metrics,
pictures and the Hydra entry point. Nothing in the library (callback, mixin, Fisher, consolidation) imports from here.
"""

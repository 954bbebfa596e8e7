"""``python -m lightning_ewc``: the same entry point as the ``lightning-ewc`` console script."""

from lightning_ewc.app.cli import main

if __name__ == "__main__":
    main()

"""``python -m lightning_ewc`` and the ``lightning-ewc`` console script: the app's command line.

This entry point sits outside :mod:`lightning_ewc.app` so that where only the library is installed (without the
app's extra) the command can still say what to install, instead of ending in a traceback.
"""

import sys


def main() -> None:
    try:
        from lightning_ewc.app.cli import main as app_main
    except ImportError as err:
        if err.name != "lightning_ewc.app":  # not the app's own check: a genuine failure, keep its traceback
            raise
        sys.exit(f"lightning-ewc: {err}")
    app_main()


if __name__ == "__main__":
    main()

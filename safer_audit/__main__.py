"""``python -m safer_audit``: the same command line as the ``safer-audit`` script (``cli.main``)."""

from .cli import main

if __name__ == "__main__":
    main()

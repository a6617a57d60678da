"""``python -m cordvoice``: the same command line as the ``cordvoice`` script."""

from __future__ import annotations

from cordvoice.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

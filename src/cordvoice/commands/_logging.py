"""Logging for the long-running commands: the wire log follows the verbosity the user chose.

:mod:`cordvoice.wirelog` pins ``cordvoice.wire`` at INFO so that frames (which carry secrets) stay out of
DEBUG logs; on its own that level also lets every "connection open" through a quiet command line. A command
lowers it to the root logger's level, never below INFO: ``-v`` shows connection events, nothing shows frames.
"""

from __future__ import annotations

import logging

__all__ = ["follow_verbosity"]


def follow_verbosity() -> None:
    """Make ``cordvoice.wire`` no chattier than the root logger (and never chattier than INFO)."""
    level = max(logging.INFO, logging.getLogger().getEffectiveLevel())
    logging.getLogger("cordvoice.wire").setLevel(level)

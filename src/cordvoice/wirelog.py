"""The logger cordvoice hands to websockets for its sockets, kept out of DEBUG on purpose.

websockets logs every frame at DEBUG (``> TEXT '{"op":0,"d":{"token":...'``): Identify and Resume carry the
bot's and the voice session's tokens, Session Description the transport key. An application that turns on
DEBUG logging to chase a voice problem would then paste secrets into its issue tracker. So every WebSocket
cordvoice opens (and the emulator's, whose tokens are fake but whose users copy the habit) logs through
``cordvoice.wire``, which is set to INFO here: errors and connection events still show, frames do not.
Lower it yourself (``logging.getLogger("cordvoice.wire").setLevel(logging.DEBUG)``) to see frames, secrets
included.
"""

from __future__ import annotations

import logging

__all__ = ["WIRE_LOGGER"]

WIRE_LOGGER = logging.getLogger("cordvoice.wire")
if WIRE_LOGGER.level == logging.NOTSET:  # a level the application chose stays
    WIRE_LOGGER.setLevel(logging.INFO)

"""The ``closed`` property and ``with`` support shared by audio objects that hold a native resource.

The codec, decoder, demuxer and DCA classes each free something (libopus state, an FFmpeg container, a
file) in an idempotent ``close``; this mixin gives them the same small surface around it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["Closeable"]


class Closeable:
    """``with obj:`` closes ``obj`` on exit; ``closed`` reads ``_closed``, which the subclass sets.

    The subclass's ``close`` must be idempotent: a ``with`` block may end after an explicit ``close``.
    """

    _closed: bool

    def close(self) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

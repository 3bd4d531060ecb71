"""``Inflater``: a body's Content-Encoding undone chunk by chunk, never past the cap."""

from __future__ import annotations

import zlib

from crawler.errors import ServerError

_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class Inflater:
    """Each chunk read inflates to at most what the cap has left (plus one byte, so passing it
    shows): a 250 KB gzip bomb is never more than the cap in memory, however fast it arrives."""

    def __init__(self, encoding: str, cap: int) -> None:
        if encoding not in ("identity", "", *_WBITS):
            # we ask for gzip or deflate only; the value itself is the server's text: not echoed
            raise ServerError("a Content-Encoding that was not asked for")
        self._wbits = _WBITS.get(encoding)
        self._left = cap
        self._inflate = self._new() if self._wbits is not None else None
        self._started = False
        self.over = False  # more than the cap was there

    def _new(self) -> zlib._Decompress:
        return zlib.decompressobj(self._wbits or zlib.MAX_WBITS)

    def feed(self, data: bytes) -> bytes:
        """The next chunk of the body as sent -> the bytes it inflates to (within the cap)."""
        if self._inflate is None:
            self._left -= len(data)
            self.over = self._left < 0
            return data
        out: list[bytes] = []
        while data and not self.over:
            chunk = self._step(data)
            out.append(chunk)
            self._left -= len(chunk)
            inflate = self._inflate
            if inflate.unconsumed_tail:  # it would have inflated past the cap
                self.over = True
            elif inflate.eof and inflate.unused_data:  # a gzip of several members
                data = inflate.unused_data
                self._inflate = self._new()
            else:
                data = b""
        return b"".join(out)

    def _step(self, data: bytes) -> bytes:
        assert self._inflate is not None  # noqa: S101 -- feed checked it
        try:
            chunk = self._inflate.decompress(data, max(self._left, 0) + 1)
        except zlib.error:
            if self._wbits != zlib.MAX_WBITS or self._started:
                raise ServerError("a compressed body that does not inflate") from None
            # "deflate" is often sent raw, without its zlib header
            self._wbits = -zlib.MAX_WBITS
            self._inflate = self._new()
            return self._step(data)
        self._started = True
        return chunk

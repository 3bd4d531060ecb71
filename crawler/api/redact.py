"""Text from the server made fit to show: secrets blotted out, control characters gone, capped.

Whatever an answer says (a ``message``, a ``Location``) may end up in an error, and from there in
a log, the state, the run report or on a terminal. The server holds the API key (it is sent to
it), so it can say it back: plainly, echoed as ``Bearer <key>``, URL-encoded (wholly or in part,
in either case), or broken up by control or invisible characters that a terminal would not show.
A ``Redactor`` is built from the secrets of one run and turns any such text into a short line
with each of them replaced by ``***``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "***"
LIMIT = 200  # characters of server text kept in a message

# characters a terminal does not show as themselves: C0 and C1 controls, DEL, line and paragraph
# separators, the invisible formatting characters (Unicode category Cf) and lone surrogates
# (aiohttp decodes header bytes that are not UTF-8 into those)
_HIDDEN = (
    "\x00-\x1f\x7f-\x9f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e"
    "\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff"
    "\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0001\U000e0020-\U000e007f"
)
_HIDDEN_RUN = re.compile(f"[{_HIDDEN}]+")
# what may sit between two characters of a secret and still leave it readable, once hidden
# characters are spaces: a few spaces, or controls written URL-encoded
_GAP = r"(?:\s|%(?:25)?[01][0-9a-f]|%(?:25)?7f){0,4}"
_GAP_LONGEST = 4 * len("%25xx")
# a bearer token of any value (RFC 6750's b64token, URL-encoded or not): whoever's it is
_BEARER = re.compile(r"(\bBearer(?:\s|%20|\+)+)[A-Za-z0-9\-._~+/%]+=*", re.IGNORECASE)
# server text searched at most: a message this long is no message; the cut is made safe below
_SCAN = 1 << 16


def _char(c: str) -> str:
    """One character of a secret: as itself, or URL-encoded once or twice."""
    encoded = ["".join(f"%{prefix}{byte:02x}" for byte in c.encode()) for prefix in ("", "25")]
    return f"(?:{re.escape(c)}|{'|'.join(encoded)})"


class Redactor:
    """``redactor(text)``: the text with every secret given replaced by ``***``, hidden
    characters turned into spaces, at most ``LIMIT`` characters. Never shows the secrets:
    its repr counts them."""

    def __init__(self, secrets: Iterable[str]) -> None:
        kept = sorted({s for s in secrets if s}, key=len, reverse=True)  # a longer one first
        self._count = len(kept)
        patterns = [_GAP.join(_char(c) for c in secret) for secret in kept]
        self._secrets = re.compile("|".join(patterns), re.IGNORECASE) if patterns else None
        # the most characters a secret can take in text, written out in any form matched
        longest = max((len(s) for s in kept), default=0)
        self._partial = longest * (len("%25xx") * 4 + _GAP_LONGEST)

    def __repr__(self) -> str:
        return f"Redactor({self._count} secrets)"

    def __call__(self, text: object, limit: int = LIMIT) -> str:
        raw = text if isinstance(text, str) else str(text)
        # hidden characters first: a secret broken up by them reads as a whole on a terminal
        shown = _HIDDEN_RUN.sub(" ", raw[:_SCAN])
        if self._secrets is not None:
            shown = self._secrets.sub(MASK, shown)
        shown = _BEARER.sub(rf"\g<1>{MASK}", shown)
        if len(raw) > _SCAN:  # the start of a secret cut off at the end is no match: left out
            limit = min(limit, len(shown) - self._partial)
        return shown[: max(limit, 0)].strip()

    def finds(self, text: str) -> bool:
        """Whether the text holds one of the secrets, in any of the forms blotted out."""
        if self._secrets is None:
            return False
        return self._secrets.search(_HIDDEN_RUN.sub(" ", text)) is not None


NOTHING = Redactor(())  # no secret known: still strips hidden characters and caps the length

"""Short-lived signed links to one recording, for the search page's <audio> elements.

An <audio> element cannot send an Authorization header, so when the search service has an API key
its answers carry audio URLs with a token: `<expires>.<signature>`, where the signature is an
HMAC-SHA256 over the audio id and the expiry time, keyed by a secret derived from the API key.
Every replica derives the same secret, so a link signed by one replica plays through another;
changing the key invalidates every link. A token names one recording: it cannot fetch another.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time


def _secret(api_key: str) -> bytes:
    return hmac.new(api_key.encode(), b"larcq-search audio links v1", hashlib.sha256).digest()


def _signature(api_key: str, audio_id: str, expires: int) -> str:
    mac = hmac.new(_secret(api_key), f"{audio_id}\n{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def sign(api_key: str, audio_id: str, ttl_s: int, now: float | None = None) -> str:
    expires = int((time.time() if now is None else now) + ttl_s)
    return f"{expires}.{_signature(api_key, audio_id, expires)}"


def check(api_key: str, audio_id: str, token: str | None, now: float | None = None) -> str | None:
    """None when `token` lets its holder fetch `audio_id` now; otherwise why not."""
    if not token:
        return "this audio link needs a token (or an Authorization: Bearer header)"
    expires_s, _, sig = token.partition(".")
    if not expires_s.isdigit() or not sig:
        return "malformed audio token"
    if not hmac.compare_digest(sig, _signature(api_key, audio_id, int(expires_s))):
        return "invalid audio token"
    if int(expires_s) < (time.time() if now is None else now):
        return "expired audio token: search again for fresh links"
    return None

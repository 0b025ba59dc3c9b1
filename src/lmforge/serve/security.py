"""API keys, per-key rate limits, and the Host header check.

Keys come from a file (one a line, `#` comments) or the LMFORGE_API_KEYS environment
variable (comma-separated). Only their SHA-256 digests are kept; a presented key is hashed
and compared with every stored digest by `hmac.compare_digest`, so neither the comparison
nor the loop stops early. Keys are long random strings, so a fast hash is enough; what
identifies a key in logs and metrics is a short prefix of its digest, never the key.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError

KEYS_ENV = "LMFORGE_API_KEYS"
MIN_KEY_LENGTH = 16


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class ApiKeys:
    def __init__(self, keys: list[str]):
        for k in keys:
            if len(k) < MIN_KEY_LENGTH:
                raise LmforgeError(f"an API key is shorter than {MIN_KEY_LENGTH} characters; "
                                   "make keys with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        self._digests = [_digest(k) for k in dict.fromkeys(keys)]

    @classmethod
    def load(cls, file: str | Path | None = None, env: dict[str, str] | None = None) -> "ApiKeys":
        env = os.environ if env is None else env
        keys: list[str] = []
        if file is not None:
            path = Path(file)
            try:
                lines = path.read_text().splitlines()
            except OSError as e:
                raise LmforgeError(f"cannot read the API key file {path}: {e.strerror}") from None
            keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
            if not keys:
                raise LmforgeError(f"the API key file {path} holds no keys")
        keys += [k.strip() for k in env.get(KEYS_ENV, "").split(",") if k.strip()]
        return cls(keys)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def identify(self, presented: str) -> str | None:
        """The key's id (a digest prefix) if the key is one of ours, else None."""
        d = _digest(presented)
        match = None
        for stored in self._digests:
            if hmac.compare_digest(d, stored):
                match = stored
        return None if match is None else "key-" + match.hex()[:8]


@dataclass
class _Bucket:
    level: float
    stamp: float


class RateLimiter:
    """Token buckets per key: `per_minute` units refill evenly over a minute, bursts up to that."""

    def __init__(self, per_minute: float | None, clock=time.monotonic):
        self.per_minute, self.clock = per_minute, clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, key: str, amount: float) -> float:
        """Take `amount` now and return 0, or take nothing and return the seconds to wait."""
        if not self.per_minute:
            return 0.0
        rate = self.per_minute / 60.0
        with self._lock:
            now = self.clock()
            b = self._buckets.setdefault(key, _Bucket(self.per_minute, now))
            b.level = min(self.per_minute, b.level + (now - b.stamp) * rate)
            b.stamp = now
            if b.level >= amount:
                b.level -= amount
                return 0.0
            # More than a whole minute's allowance can never pass; say when the bucket is full.
            missing = min(amount, self.per_minute) - b.level
            return max(1.0, math.ceil(missing / rate))

    def give_back(self, key: str, amount: float) -> None:
        """Return what a request reserved but did not use."""
        if not self.per_minute or amount <= 0:
            return
        with self._lock:
            b = self._buckets.get(key)
            if b is not None:
                b.level = min(self.per_minute, b.level + amount)


# -- Host header -----------------------------------------------------------------------------------
# A web page can reach a server on loopback through its own domain name: it points the name at
# 127.0.0.1 once its page has loaded (DNS rebinding), and its requests then carry its own name
# in Host. A loopback server that answers only loopback names cannot be reached that way.
def is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or address).is_loopback


def host_name(header: str) -> str:
    """The name in a Host header: no port, no IPv6 brackets, no trailing dot, lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    name, colon, port = header.rpartition(":")
    if colon and port.isdigit():
        header = name
    return header.rstrip(".")


def host_allowed(header: str | None, local_address: str | None, allowed: list[str]) -> bool:
    """Whether a request that reached `local_address` with this Host header may be served.
    With no `allowed` names, requests that arrived on a loopback address must name a loopback
    host, and others are not checked; with names, every request must name one of them or a
    loopback host ("*" allows any)."""
    if "*" in allowed:
        return True
    if not allowed and not (local_address and is_loopback(local_address)):
        return True
    if header is None:  # HTTP/1.0 without Host: no browser sends that
        return True
    name = host_name(header)
    return is_loopback(name) or name in {host_name(a) for a in allowed}

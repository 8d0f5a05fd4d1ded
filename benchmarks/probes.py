"""Parts of the built-in openssl probe as separate validators, to measure
which part catches what (benchmarks.fork_hazard --variants)."""

from __future__ import annotations

import hashlib
import ssl


def rand_and_fetch() -> None:
    ssl.RAND_bytes(16)
    hashlib.pbkdf2_hmac("sha256", b"zygote", b"salt", 1)


def context() -> None:
    ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)

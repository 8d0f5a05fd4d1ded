"""A preload module with the bug zygote exists for: background threads doing
ordinary OpenSSL work (TLS contexts, key derivation), as metrics exporters or
token refreshers do. A plain fork() of this process now and then gives a
child that hangs forever on a lock inside OpenSSL.

    zygote start --preload examples.openssl_threads --validate-timeout 1
    zygote spawn examples.openssl_threads:digest hello

zygote warns about both threads at the first fork, probes every child with
its openssl validator, and replaces the ones that hang.
"""

from __future__ import annotations

import hashlib
import ssl
import threading


def _contexts() -> None:
    while True:
        ssl.create_default_context()


def _key_derivation() -> None:
    while True:
        hashlib.pbkdf2_hmac("sha256", b"password", b"salt", 1000)


for _target, _name in ((_contexts, "tls-contexts"), (_key_derivation, "pbkdf2")):
    threading.Thread(target=_target, name=_name, daemon=True).start()


def digest(text: object) -> str:
    """A task that uses OpenSSL itself, as one that opens a TLS connection does."""
    ssl.create_default_context()
    return hashlib.sha256(str(text).encode()).hexdigest()

"""A small local TLS echo server, for trying `examples.service_threads`
(and used by its tests and benchmark): `python -m examples.tls_server`.

It makes a throwaway self-signed certificate for localhost (with the
`openssl` command), listens on 127.0.0.1, prints `HOST PORT CAFILE` on one
line, and answers every line a client sends with the same line, until it is
killed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socketserver
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def certificate() -> Iterator[tuple[str, str]]:
    """A self-signed certificate and key for localhost, for the block's duration."""
    if shutil.which("openssl") is None:
        raise SystemExit("examples.tls_server needs the openssl command to make a certificate")
    directory = tempfile.mkdtemp(prefix="zygote-tls-")
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    try:
        request = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
        names = ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
        subprocess.run(
            ["openssl", *request, "-keyout", key, "-out", cert, *names],
            check=True,
            capture_output=True,
        )
        yield cert, key
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class _Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError):
            for line in self.rfile:
                self.wfile.write(line)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), _Echo)
        self.context = context

    def get_request(self):  # type: ignore[no-untyped-def]
        sock, address = super().get_request()
        # The handshake happens in the request's thread, on first read.
        return self.context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        ), address


@contextlib.contextmanager
def running(cwd: str | os.PathLike[str] | None = None) -> Iterator[str]:
    """This server in a process of its own for the block's duration; yields
    its address as HOST:PORT:CAFILE (what examples.service_threads reads)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "examples.tls_server"], cwd=cwd, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        host, port, cafile = process.stdout.readline().split()
        yield f"{host}:{port}:{cafile}"
    finally:
        process.kill()
        process.wait(10)


def main() -> None:
    with certificate() as (cert, key):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        with _Server(context) as server:
            host, port = server.server_address[:2]
            print(host, port, cert, flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())

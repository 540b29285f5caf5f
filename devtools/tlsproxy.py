"""A TLS-terminating TCP proxy: an https endpoint in front of a plain http one (tests, demos).

Companies run S3 behind HTTPS with certificates from a private CA; the local JuiceFS gateway speaks
plain http. `TlsProxy` accepts TLS on 127.0.0.1 with a given certificate and key and pipes the
decrypted bytes to the upstream port unchanged (the Host header too, so SigV4 signatures made for
the proxy's address verify upstream). It runs an asyncio server in a thread of its own; every
connection is counted, as is every failed handshake (a client that does not trust the CA).

    with TlsProxy("http://127.0.0.1:9000", cert, key) as p:
        p.url  # https://127.0.0.1:<port>
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

_CHUNK = 256 * 1024


class TlsProxy:
    def __init__(self, upstream: str, cert_file: str | Path, key_file: str | Path, *, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        u = urlsplit(upstream)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = (u.hostname, u.port or 80)
        self.host, self.port = host, port
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(str(cert_file), str(key_file))
        self.counts: Counter[str] = Counter()  # connections, handshake_failed, bytes_up, bytes_down
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def start(self) -> TlsProxy:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                self._server = loop.run_until_complete(asyncio.start_server(
                    self._serve, self.host, self.port, ssl=self.ctx, ssl_handshake_timeout=10))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                errors.append(exc)
                ready.set()
                loop.close()
                return
            loop.set_exception_handler(self._on_loop_error)
            ready.set()
            loop.run_forever()
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            pending = asyncio.all_tasks(loop)
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=5))
            loop.close()

        self._thread = threading.Thread(target=run, name=f"tlsproxy-{self.upstream[1]}", daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> TlsProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        exc = context.get("exception")
        if isinstance(exc, (ssl.SSLError, ConnectionError, OSError)):  # a client that refused our certificate
            self.counts["handshake_failed"] += 1
            return
        loop.default_exception_handler(context)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counts["connections"] += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer, "bytes_up"), self._pipe(up_reader, writer, "bytes_down"),
                             return_exceptions=True)
        for w in (writer, up_writer):
            with contextlib.suppress(Exception):
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: str) -> None:
        try:
            while data := await reader.read(_CHUNK):
                writer.write(data)
                self.counts[counter] += len(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                if writer.can_write_eof():
                    writer.write_eof()
                else:
                    writer.close()

"""The pool's connection to its zygote server: an embedded one it starts
(`zygote.embedded`, preloading the worker's app), or `$ZYGOTE_ENDPOINT`'s.
An embedded server that died (killed, out of memory) is replaced rather
than failing every task after it. The async methods run on the pool's
asyncio thread."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from zygote import aio
from zygote.embedded import EmbeddedServer, preload_from_env
from zygote.errors import ZygoteError

log = logging.getLogger("zygote.celery")


class ServerConnection:
    """Where the pool's tasks are spawned."""

    def __init__(self) -> None:
        self.server: EmbeddedServer | None = None
        self.endpoint = ""
        self.client: aio.Zygote | None = None
        self._reviving: asyncio.Lock | None = None

    def start(self, app_path: str, hostname: str, limit: int) -> None:
        """Start the embedded server unless `$ZYGOTE_ENDPOINT` names one."""
        self.endpoint = os.environ.get("ZYGOTE_ENDPOINT", "")
        if self.endpoint:
            return
        self.server = EmbeddedServer(
            # $ZYGOTE_PRELOAD first: a thread that, say, numpy starts is
            # then named after numpy (--allow-thread numpy), not the app.
            [*preload_from_env(), app_path.partition(":")[0], "zygote_celery.child"],
            # -c is the pool's own limit (its semaphore). The server's
            # counts a fork until it has exited, after its result: with
            # -c slots, the next task waited for that exit (spawn p50
            # 17.5 against 6.5 ms with twice -c, measured).
            max_workers=None if "ZYGOTE_MAX_WORKERS" in os.environ else 2 * limit,
            env={"ZYGOTE_CELERY_APP": app_path, "ZYGOTE_CELERY_HOSTNAME": hostname},
        )
        self.endpoint = self.server.start()

    async def open(self) -> aio.Zygote:
        self._reviving = asyncio.Lock()
        self.client = aio.Zygote(self.endpoint)
        await self.client.ping()
        return self.client

    async def spawn(self, task: str, *args: Any) -> aio.Handle:
        client = self.client
        assert client is not None
        process = self.server.process if self.server is not None else None
        if process is not None and process.poll() is not None:
            # Dead already: do not wait seconds for it to answer first.
            await self._revive(client)
            client = self.client
            assert client is not None
        try:
            return await client.spawn(task, *args)
        except ZygoteError:
            if not await self._revive(client):
                raise
        assert self.client is not None
        return await self.client.spawn(task, *args)

    async def _revive(self, failed: aio.Zygote) -> bool:
        """If our embedded server died, start another; True if there is a
        new one to try. Its running tasks were lost with it."""
        assert self._reviving is not None
        async with self._reviving:
            if self.client is not failed:  # another task revived it meanwhile
                return True
            server = self.server
            if server is None or server.process is None or server.process.poll() is None:
                return False  # not ours, or alive: the error stands
            log.error(
                "zygote pool: the embedded zygote server exited with status %s; starting another",
                server.process.returncode,
            )
            await failed.close()
            server.stop()  # its directory
            # Started from an executor thread: it lives as long as this loop,
            # and the server's parent-death signal follows the thread.
            loop = asyncio.get_running_loop()
            self.endpoint = await loop.run_in_executor(None, server.start)
            self.client = aio.Zygote(self.endpoint)
            await self.client.ping()
            return True

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    def stop(self, grace: float) -> None:
        """The embedded server, if we started one."""
        if self.server is not None:
            self.server.stop(grace=grace)
            self.server = None

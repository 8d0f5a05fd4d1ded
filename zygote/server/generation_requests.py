"""Clients' refork and reload requests, answered by the supervisor: a reload
at once (the new generation's number), a refork once its generation serves
or has failed. Part of the supervisor process."""

from __future__ import annotations

import collections
from collections.abc import Callable

from ..protocol import DEFAULT_PROFILE, Error, ErrorCode, Message, Ok, Refork, Reload
from .fleet import Fleet
from .store import Envelope


class GenerationRequests:
    """`fleets` by profile (filled by the caller); `send` answers a client."""

    def __init__(self, fleets: dict[str, Fleet], send: Callable[[Envelope, Message], object]):
        self.fleets = fleets
        self.send = send
        # Clients waiting for an on-demand refork's outcome, by profile.
        self._waiters: dict[str, list[tuple[Envelope, int]]] = collections.defaultdict(list)

    def unknown_profile(self, profile: str | None) -> str:
        """Why `profile` is not one of ours; "" if it is (or None: the default)."""
        if profile is None or profile in self.fleets:
            return ""
        return f"unknown profile {profile!r}: this server has {', '.join(self.fleets)}"

    def request(self, envelope: Envelope, msg: Refork | Reload, stopping: str | None) -> None:
        """Start what `msg` asks for, or refuse it (`stopping`: why we stop)."""
        unknown = self.unknown_profile(msg.profile)
        if stopping or unknown:
            code = ErrorCode.SHUTTING_DOWN if stopping else ErrorCode.BAD_REQUEST
            self.send(envelope, Error(msg.req, code, unknown or stopping or ""))
        elif isinstance(msg, Reload):
            names = [msg.profile] if msg.profile else list(self.fleets)
            generations = {name: self.fleets[name].reload() for name in names}
            info = {"generation": generations[names[0]], "generations": generations}
            self.send(envelope, Ok(msg.req, info))
        else:
            profile = msg.profile or DEFAULT_PROFILE
            self._waiters[profile].append((envelope, msg.req))  # answered on the outcome
            self.fleets[profile].refork()

    def switched(self, profile: str, generation: int | None, error: str | None) -> None:
        """A new generation took over, or did not: tell whoever asked for a refork."""
        for envelope, req in self._waiters.pop(profile, []):
            if generation is not None:
                self.send(envelope, Ok(req, {"generation": generation}))
            else:
                self.send(envelope, Error(req, ErrorCode.REFORK_FAILED, error or "?"))

    def stop(self, why: str) -> None:
        """The server stops: every refork still waited for fails with `why`."""
        for waiters in self._waiters.values():
            for envelope, req in waiters:
                self.send(envelope, Error(req, ErrorCode.SHUTTING_DOWN, why))
        self._waiters.clear()

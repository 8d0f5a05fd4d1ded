"""When to promote a warm worker to be the next zygote generation (a refork).
No I/O.

On demand (`Zygote.refork()`, `zygote refork`, SIGUSR2): the next worker of
the current generation to finish its task successfully is the candidate;
the request holds for `--refork-timeout` seconds. By policy
(`--refork-after N[,N...]`): once the current generation has served N
spawns — the first number for the first refork, the next for the next, the
last one repeating. One promotion at a time; after a failed one the
policy backs off (doubling, up to a minute) so that a candidate refused for
a reason that persists (a thread every task leaves behind) is not retried on
every job. A request does not wait for the back-off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

BACKOFF_FIRST, BACKOFF_CAP = 1.0, 60.0


class ReforkPolicy:
    def __init__(self, after: Sequence[int], clock: Callable[[], float]) -> None:
        self.after = list(after)
        self.clock = clock
        self.reforks = 0  # promotions that took over
        self.failures = 0  # candidates refused or failed
        self.requested_until: float | None = None
        self._not_before = 0.0
        self._delay = 0.0

    def request(self, timeout: float) -> None:
        """A refork was asked for: promote the next candidate, within `timeout`."""
        self.requested_until = self.clock() + timeout

    @property
    def requested(self) -> bool:
        return self.requested_until is not None

    def threshold(self) -> int | None:
        """Spawns after which the current generation is due, by the policy."""
        if not self.after:
            return None
        return self.after[min(self.reforks, len(self.after) - 1)]

    def due(self, spawns: int) -> bool:
        """Is a candidate wanted from a generation that has served `spawns`?
        A request is always served; the policy waits out its back-off."""
        if self.requested:
            return True
        threshold = self.threshold()
        return threshold is not None and spawns >= threshold and self.clock() >= self._not_before

    def expired(self) -> bool:
        """True once (and then forgotten) if an on-demand request ran out."""
        if self.requested_until is None or self.clock() < self.requested_until:
            return False
        self.requested_until = None
        return True

    def succeeded(self) -> None:
        self.reforks += 1
        self.requested_until = None
        self._delay = 0.0
        self._not_before = 0.0

    def failed(self) -> None:
        """A candidate was refused or failed: an on-demand request is
        answered with that (not retried), the policy backs off."""
        self.failures += 1
        self.requested_until = None
        self._delay = min(max(BACKOFF_FIRST, self._delay * 2), BACKOFF_CAP)
        self._not_before = self.clock() + self._delay

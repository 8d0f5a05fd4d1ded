"""What a new child runs before it reports ready, chosen once per zygote:
the after-fork hooks, the deferred threads' start, then the validators —
the user's, and the built-in probes when the zygote has other threads.
The zygote (forkserver.py) hands the list to each child; the child
(worker.py) runs it and reports each step as its phase.
"""

from __future__ import annotations

import logging

from .. import hooks
from ..protocol import Boot
from . import inventory, validators, worker

log = logging.getLogger("zygote.zygote")


class StartupSteps:
    """What a new child runs before it reports ready: the after-fork hooks,
    then the validators — the built-in probes only when the zygote has other
    threads (without them nothing can have been left locked)."""

    def __init__(self, boot: Boot) -> None:
        disabled = set(boot.disable_validators)
        user = dict(hooks.VALIDATORS)
        for name in boot.validators:
            user[name] = worker.resolve(name)
        self._hooks = [(f"after_fork:{hooks._name(f)}", f) for f in hooks.AFTER_FORK]
        if inventory.DEFERRED:  # --thread-policy defer: after the hooks, before the checks
            self._hooks.append(("deferred threads", inventory.start_deferred))
        self._user = [(name, f) for name, f in user.items() if name not in disabled]
        self._probes = {n: p for n, p in validators.builtin().items() if n not in disabled}
        self.alone = worker.Step.of(self._hooks + self._user)
        self._threaded: list[worker.Step] | None = None

    def threaded(self) -> list[worker.Step]:
        """The steps with the built-in probes. Probes with lazy set-up run once
        here first (at the first fork with threads, so that a thread-free
        zygote never loads what they need), so that it happens before the fork
        and not in every child; one that fails even here (no "localhost" to
        resolve, say) would fail every child, so it is dropped with a warning."""
        if self._threaded is None:
            for name in validators.WARM_UP & self._probes.keys():
                try:
                    self._probes[name]()
                except Exception as exc:
                    log.warning(
                        "built-in validator %r fails in the zygote itself (%s); not using it",
                        name,
                        exc,
                    )
                    del self._probes[name]
            self._threaded = worker.Step.of(self._hooks + list(self._probes.items()) + self._user)
        return self._threaded

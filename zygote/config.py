"""Server settings: one dataclass holding every option and its default.

The CLI fills it from (highest first) command-line options, `ZYGOTE_*`
environment variables and a TOML file; docs/configuration.md lists them.
"""

from __future__ import annotations

import dataclasses
import grp
import logging
import os
import pwd
import signal
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .logs import LOG_FORMAT, LOG_FORMATS, setup_logging
from .protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_PROFILE,
    ProtocolError,
    check_profile_name,
)

__all__ = [
    "LOG_FORMAT",
    "ConfigError",
    "ServerConfig",
    "default_endpoint",
    "load_toml",
    "runtime_dir",
    "setup_logging",
]


#: Settings that existed once: a config file naming one still loads.
REMOVED = {
    "prevent_fork_warning": "a fork now waits at most --fork-guard-timeout for prevent_fork()",
}


class ConfigError(ValueError):
    """A setting that cannot be used; the message says which and why."""


def runtime_dir() -> Path:
    """The per-user directory for the default endpoint: $XDG_RUNTIME_DIR/zygote
    when set, else /tmp/zygote-<uid>; created 0700 and checked to be ours."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base, "zygote") if base else Path(f"/tmp/zygote-{os.getuid()}")
    return path


def ensure_private_dir(path: Path) -> None:
    """Create `path` 0700, or check that an existing one is ours and private.

    /tmp is shared: another user could have created the directory first, to
    read or hijack the socket inside it. Refuse anything we do not own.
    """
    try:
        path.mkdir(mode=0o700, parents=False)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create the directory {path}: {exc.strerror}") from None
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{path} exists and is not a directory")
    if info.st_uid != os.getuid():
        raise ConfigError(f"{path} belongs to uid {info.st_uid}, not to us ({os.getuid()})")
    if info.st_mode & 0o077:
        raise ConfigError(f"{path} is accessible by other users (mode {info.st_mode & 0o777:o})")


def check_endpoint(endpoint: str) -> None:
    """ConfigError unless `endpoint` is ipc://PATH or tcp://HOST:PORT with a
    real port (libzmq would take port 99999 modulo 65536, or say "Invalid
    argument" at bind time)."""
    if endpoint.startswith("ipc://") and endpoint != "ipc://":
        return
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    if not endpoint.startswith("tcp://") or not host:
        raise ConfigError(f"endpoint must be ipc://PATH or tcp://HOST:PORT, not {endpoint!r}")
    if port != "*" and not (port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(
            f"the port of {endpoint} must be a number from 1 to 65535 (or *), not {port!r}"
        )


def default_endpoint() -> str:
    """`$ZYGOTE_ENDPOINT`, else an ipc socket in the per-user runtime dir."""
    return os.environ.get("ZYGOTE_ENDPOINT") or f"ipc://{runtime_dir() / 'zygote.sock'}"


@dataclass
class ServerConfig:
    """Every server setting with its default. Durations are in seconds."""

    endpoint: str = field(default_factory=default_endpoint)
    preload: list[str] = field(default_factory=list)
    #: more zygote lineages, each with its own preload, generations, ready
    #: pool and helper: name -> modules (`--profile NAME=MOD[,MOD...]`)
    profiles: dict[str, list[str]] = field(default_factory=dict)
    #: live workers at most; further spawns wait in the queue
    max_workers: int = field(default_factory=lambda: max(2, os.cpu_count() or 2))
    #: children forked and validated ahead of need (not counted as workers)
    prefork: int = 2
    #: spawns waiting for a free slot at most; past it clients get ServerBusy
    queue_size: int = 1000
    #: a new child must pass its hooks and validators and report ready within this
    validate_timeout: float = 10.0
    #: extra validators, "module:function", imported by the zygote after the preload
    validators: list[str] = field(default_factory=list)
    #: validators not to run, by name (built-in: openssl, logging, stdio, resolver)
    disable_validators: list[str] = field(default_factory=list)
    #: how a child that failed or missed its deadline is killed; SIGABRT makes
    #: faulthandler print where it hung
    kill_signal: str = "SIGKILL"
    #: threads in the zygote at fork time: "warn" (and fork), "refuse" to
    #: fork, or "defer" the starts of threads while preloading to each worker
    thread_policy: str = "warn"
    #: thread names (fnmatch patterns) known to be safe, silenced in warnings
    allow_threads: list[str] = field(default_factory=list)
    #: with threads in the zygote, hold logging, OpenSSL, the resolver,
    #: prevent_fork() sections and fork_lock()s across each fork
    fork_guards: bool = True
    #: a fork waits at most this for threads to leave the guards, then forks
    #: anyway (logged, counted) and leaves the rest to the validators;
    #: by default 1 s, or half of fork_timeout if that is shorter
    fork_guard_timeout: float | None = None
    #: the before_exit hooks of a worker, all together, get this long
    exit_timeout: float = 2.0
    #: this many corrupt children in a row retire the zygote for a fresh one
    corrupt_limit: int = 3
    #: this many failed zygotes in a row (corrupt, dead or unable to preload
    #: before any healthy child) stop the server
    zygote_failure_limit: int = 3
    #: the zygote must answer a fork request within this, or it is replaced
    fork_timeout: float = 5.0
    #: failed starts of one request that are retried before the client sees SpawnError
    spawn_retries: int = 3
    #: after SIGTERM (task timeout, graceful stop), SIGKILL follows after this
    kill_grace: float = 5.0
    #: graceful stop: running workers get this long to finish before SIGTERM
    shutdown_grace: float = 30.0
    #: a new zygote must finish its preload within this
    boot_timeout: float = 120.0
    #: a result no client has confirmed is dropped (logged) after this
    result_ttl: float = 3600.0
    #: unconfirmed results kept at most; the oldest is dropped (logged) past it
    max_results: int = 10000
    #: and at most this many bytes of them in all (the oldest dropped, logged)
    max_results_bytes: int = 1 << 30
    #: largest client message accepted, and largest task result
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    log_level: str = "INFO"
    #: refork policy: after this many spawns in a generation, promote the next
    #: worker that finishes its task (the last number repeats; empty: only on demand)
    refork_after: list[int] = field(default_factory=list)
    #: an on-demand refork waits this long for a worker to finish a task
    refork_timeout: float = 60.0
    #: CURVE for the endpoint: the server's NAME.key_secret (`zygote keygen`)
    curve_secret: str | None = None
    #: and the directory of the public keys (NAME.key) of the clients let in
    curve_clients: str | None = None
    #: allow a tcp endpoint without CURVE: anyone who reaches it runs code
    insecure: bool = False
    #: tasks clients may spawn, fnmatch patterns on "module:qualname"; when
    #: empty: anything on ipc, on tcp only the preloaded modules' own
    allow_tasks: list[str] = field(default_factory=list)
    #: kill what a job leaves behind with a cgroup v2 per child where the
    #: hierarchy is writable; off (or not writable): process groups and
    #: orphan sweeps, which a supervisor SIGKILL escapes (docs/cleanup-and-limits.md)
    cgroups: bool = True
    #: bytes a worker may use beyond what it shares with its zygote: cgroup
    #: memory.max where a memory controller is available, else RLIMIT_AS
    worker_memory: int | None = None
    #: CPU seconds a worker's task may use (RLIMIT_CPU: SIGXCPU, SIGKILL 1 s later)
    worker_cpu_seconds: float | None = None
    #: open files a worker may have (RLIMIT_NOFILE: EMFILE inside the task)
    worker_nofile: int | None = None
    #: run the zygotes and workers as this user (name or uid); the supervisor
    #: stays root to manage cgroups; needs root
    user: str | None = None
    #: ... and this group (default: the user's own group)
    group: str | None = None
    #: serve Prometheus metrics over HTTP on this HOST:PORT (needs prometheus_client)
    metrics: str | None = None
    #: write the supervisor's pid here once it listens (removed on exit)
    pidfile: str | None = None
    #: append every process's log lines to this file instead of stderr
    log_file: str | None = None
    #: "text" lines, or "json": one object per line
    log_format: str = "text"

    def __post_init__(self) -> None:
        positive = (
            "max_workers",
            "queue_size",
            "max_results",
            "max_results_bytes",
            "max_message_bytes",
            "corrupt_limit",
            "zygote_failure_limit",
        )
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, not {getattr(self, name)!r}")
        for name in (
            "validate_timeout",
            "fork_timeout",
            "boot_timeout",
            "result_ttl",
            "exit_timeout",
            "refork_timeout",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be a positive number of seconds")
        for name in ("kill_grace", "shutdown_grace"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        if self.fork_guard_timeout is None:
            self.fork_guard_timeout = min(1.0, self.fork_timeout / 2)
        if not 0 < self.fork_guard_timeout < self.fork_timeout:
            raise ConfigError(
                f"fork_guard_timeout must be positive and shorter than fork_timeout "
                f"({self.fork_timeout:g}s; a zygote that takes that long is replaced), "
                f"not {self.fork_guard_timeout:g}s"
            )
        if self.prefork < 0:
            raise ConfigError("prefork must not be negative")
        if self.spawn_retries < 0:
            raise ConfigError("spawn_retries must not be negative")
        check_endpoint(self.endpoint)
        if bool(self.curve_secret) != bool(self.curve_clients):
            raise ConfigError(
                "CURVE needs both --curve-secret (the server's NAME.key_secret) and "
                "--curve-clients (a directory of the clients' NAME.key files)"
            )
        if self.endpoint.startswith("tcp://") and not (self.curve_secret or self.insecure):
            raise ConfigError(
                f"{self.endpoint} would let anyone who reaches it run code as this user: "
                "give it CURVE keys (--curve-secret FILE --curve-clients DIR; make them with "
                "`zygote keygen`), or say --insecure"
            )
        for pattern in self.allow_tasks:
            if ":" not in pattern:
                raise ConfigError(
                    f"an --allow-task pattern matches 'module:qualname', so it has a ':' "
                    f"(like 'myapp.tasks:*'), not {pattern!r}"
                )
        if self.metrics is not None:
            host_port(self.metrics)  # checked now, bound when the server starts
        self.log_level = self.log_level.upper()
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"log_format must be text or json, not {self.log_format!r}")
        self.kill_signal = signal_by_name(self.kill_signal).name
        if self.thread_policy not in ("warn", "refuse", "defer"):
            raise ConfigError(
                f"thread_policy must be warn, refuse or defer, not {self.thread_policy!r}"
            )
        for task in self.validators:
            if ":" not in task:
                raise ConfigError(f"a validator is named 'module:function', not {task!r}")
        self.refork_after = _spawn_counts(self.refork_after)
        self.profiles = _profiles(self.profiles)
        if self.worker_memory is not None:
            self.worker_memory = parse_bytes(self.worker_memory)
        for name in ("worker_memory", "worker_cpu_seconds", "worker_nofile"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be positive, not {value!r}")
        self.credentials()  # the user and group exist, and we may switch to them

    def credentials(self) -> tuple[int, int, list[int]] | None:
        """(uid, gid, supplementary groups) to run zygotes and workers as, or
        None to run them as ourselves."""
        if self.user is None and self.group is None:
            return None
        try:
            entry = pwd.getpwnam(self.user) if self.user else pwd.getpwuid(os.getuid())
        except KeyError:
            try:
                entry = pwd.getpwuid(int(str(self.user)))
            except (KeyError, ValueError):
                raise ConfigError(f"user: no such user {self.user!r}") from None
        gid = entry.pw_gid
        if self.group is not None:
            try:
                gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                try:
                    gid = grp.getgrgid(int(self.group)).gr_gid
                except (KeyError, ValueError):
                    raise ConfigError(f"group: no such group {self.group!r}") from None
        groups = sorted(set(os.getgrouplist(entry.pw_name, gid)))
        if os.geteuid() != 0 and (entry.pw_uid, gid) != (os.geteuid(), os.getegid()):
            raise ConfigError("user/group: switching to another user needs root")
        return entry.pw_uid, gid, groups

    def task_patterns(self, profile: str) -> list[str] | None:
        """The tasks a client may spawn into `profile`, as fnmatch patterns;
        None: any (an ipc socket is private to its user)."""
        if self.allow_tasks:
            return list(self.allow_tasks)
        if self.endpoint.startswith("ipc://"):
            return None
        modules = self.lineages().get(profile, [])
        return [pattern for m in modules for pattern in (f"{m}:*", f"{m}.*:*")]

    def lineages(self) -> dict[str, list[str]]:
        """Every profile's preload, the default one (`--preload`) first."""
        return {DEFAULT_PROFILE: list(self.preload), **self.profiles}

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def _profiles(value: object) -> dict[str, list[str]]:
    """--profile heavy=numpy,pandas (repeatable), or a TOML [profiles] table
    (heavy = ["numpy", "pandas"] or "numpy,pandas") -> {"heavy": [...]}."""
    if isinstance(value, dict):
        items = list(value.items())
    else:
        items = []
        for entry in value if isinstance(value, list | tuple) else [value]:
            name, sep, modules = str(entry).partition("=")
            if not sep:
                raise ConfigError(f"a profile is NAME=MODULE[,MODULE...], not {entry!r}")
            items.append((name.strip(), modules))
    profiles: dict[str, list[str]] = {}
    for name, modules in items:
        try:
            check_profile_name(name)
        except ProtocolError:
            raise ConfigError(f"a profile name is 1-64 of [A-Za-z0-9_.-], not {name!r}") from None
        if name == DEFAULT_PROFILE or name in profiles:
            raise ConfigError(
                f"profile {name!r} is defined twice (--preload is {DEFAULT_PROFILE!r})"
            )
        listed = modules if isinstance(modules, list) else str(modules).split(",")
        profiles[name] = [str(m).strip() for m in listed if str(m).strip()]
        if not profiles[name]:
            raise ConfigError(f"profile {name!r} preloads no module")
    return profiles


def _spawn_counts(value: object) -> list[int]:
    """--refork-after "100,500" (or TOML [100, 500], or 100) -> [100, 500]."""
    items = value if isinstance(value, list | tuple) else [value]
    counts = []
    for item in items:
        for part in str(item).split(","):
            try:
                count = int(part.strip())
            except ValueError:
                count = 0
            if count < 1:
                raise ConfigError(
                    f"refork_after is a list of spawn counts like 100,500, not {value!r}"
                )
            counts.append(count)
    return counts


def parse_bytes(value: object) -> int:
    """A size: 1048576, "1048576", "512K", "64M", "2G" (binary units)."""
    text = str(value).strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    if text[-1:] in _UNITS:
        text, scale = text[:-1], _UNITS[text[-1]]
    try:
        size = int(float(text) * scale)
    except ValueError:
        raise ConfigError(f"not a size in bytes: {value!r} (e.g. 536870912, 512M, 2G)") from None
    if size < 1:
        raise ConfigError(f"a size must be positive, not {value!r}")
    return size


_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def host_port(address: str) -> tuple[str, int]:
    """ "127.0.0.1:9464" or "[::1]:9464" -> (host, port). The host is required:
    a network listener binds only where it is asked to."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"metrics address is HOST:PORT (like 127.0.0.1:9464, or 0.0.0.0:9464 to "
            f"listen on every interface), not {address!r}"
        )
    return host, int(port)


def signal_by_name(name: str | int) -> signal.Signals:
    """SIGKILL, KILL or 9 -> signal.SIGKILL."""
    text = str(name).upper()
    try:
        if text.isdigit():
            return signal.Signals(int(text))
        return signal.Signals[text if text.startswith("SIG") else "SIG" + text]
    except (KeyError, ValueError):
        raise ConfigError(f"not a signal: {name!r}") from None


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Settings from a TOML file, keys normalised to option names.

    Keys may be written `max-workers` or `max_workers`, at the top level or
    under a `[zygote]` table. Unknown keys are an error, not silently ignored.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    if isinstance(data.get("zygote"), dict):
        data = data["zygote"]
    known = set(ServerConfig.option_names())
    settings = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in REMOVED:
            logging.getLogger("zygote").warning(
                "config file %s: %r is no longer a setting (%s); ignored", path, key, REMOVED[name]
            )
            continue
        if name not in known:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        settings[name] = value
    return settings

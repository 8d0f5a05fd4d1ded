"""The options of `zygote start`: one per `ServerConfig` setting, each also
read from `$ZYGOTE_<NAME>` and from a TOML file (`--config`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from .config import ConfigError, ServerConfig, load_toml

__all__ = ["SERVER_OPTIONS", "config_file_option"]

_DEFAULTS = ServerConfig(endpoint="ipc://(default)")


def _load_config_file(ctx: click.Context, _param: click.Parameter, path: str | None) -> None:
    if path:
        try:
            settings = load_toml(path)
        except ConfigError as exc:
            raise click.BadParameter(str(exc)) from None
        profiles = settings.get("profiles")
        if isinstance(profiles, dict):  # a [profiles] table: as --profile would give it
            settings["profiles"] = [
                f"{name}={','.join(mods) if isinstance(mods, list) else mods}"
                for name, mods in profiles.items()
            ]
        ctx.default_map = {**(ctx.default_map or {}), **settings}
        ctx.meta["zygote.config"] = path


class _ServerOption(click.Option):
    """An option whose errors name where the bad value came from: the
    environment variable only when it gave the value, the config file for a
    value from there (click names the variable whenever one is declared)."""

    def get_error_hint(self, ctx: click.Context | None) -> str:
        hint = " / ".join(f"'{opt}'" for opt in self.opts)
        source = ctx.get_parameter_source(self.name) if ctx and self.name else None
        if source is ParameterSource.ENVIRONMENT:
            hint += f" (from ${self.envvar})"
        elif source is ParameterSource.DEFAULT_MAP and ctx is not None:
            hint += f" (from {ctx.meta.get('zygote.config', 'the config file')})"
        return hint


def _server_option(
    name: str, kind: Any, help: str, flag: str | None = None, **extra: Any
) -> Callable[[Any], Any]:
    """An option of `zygote start`, also read from $ZYGOTE_<NAME>. Repeatable
    options take a singular `flag` (--validator) for a plural setting."""
    default = getattr(_DEFAULTS, name)
    if name == "max_workers":
        help = f"{help} [default: the number of CPUs, at least 2; here {default}]"
    elif name == "fork_guard_timeout":
        help = f"{help} [default: 1, at most half of --fork-timeout]"
    elif (
        name not in ("endpoint", "refork_after")
        and not extra.get("multiple")
        and default is not None
    ):
        help = f"{help} [default: {default}]"
    option = "--" + (flag or name).replace("_", "-")
    if kind is bool:  # an on/off switch: --fork-guards / --no-fork-guards
        option += f"/--no-{option[2:]}"
    return click.option(
        option,
        name,
        type=kind,
        envvar="ZYGOTE_" + name.upper(),
        default=None,
        show_envvar=True,
        cls=_ServerOption,
        help=help,
        **extra,
    )


SERVER_OPTIONS = [
    _server_option("preload", str, "Module the zygote imports (repeatable).", multiple=True),
    _server_option(
        "profiles",
        str,
        "Another zygote lineage, NAME=MODULE[,MODULE...], spawned into with "
        "--profile NAME / _profile=NAME (repeatable).",
        flag="profile",
        multiple=True,
    ),
    _server_option(
        "endpoint",
        str,
        "Where to listen: ipc://PATH or tcp://HOST:PORT "
        "[default: ipc:// socket in $XDG_RUNTIME_DIR/zygote or /tmp/zygote-$UID]",
    ),
    _server_option("max_workers", click.IntRange(1), "Live workers at most."),
    _server_option("queue_size", click.IntRange(1), "Requests waiting for a slot at most."),
    _server_option(
        "prefork",
        click.IntRange(0),
        "Children kept forked and validated ahead of need (0: fork on demand).",
    ),
    _server_option("validate_timeout", float, "Seconds a new worker has to become ready."),
    _server_option(
        "validators",
        str,
        "Extra validator, module:function (repeatable).",
        flag="validator",
        multiple=True,
    ),
    _server_option(
        "disable_validators",
        str,
        "Validator not to run, by name: openssl, logging, stdio, resolver, or one of yours"
        " (repeatable).",
        flag="disable_validator",
        multiple=True,
    ),
    _server_option(
        "kill_signal",
        str,
        "Signal for a child that failed or hung in its checks (SIGABRT"
        " makes it print its stack first).",
    ),
    _server_option(
        "thread_policy",
        click.Choice(["warn", "refuse", "defer"]),
        "Threads in the zygote at fork time: warn, refuse to fork, or defer the threads"
        " the preload starts to each worker.",
    ),
    _server_option(
        "allow_threads",
        str,
        "Thread name pattern known to be fork-safe (repeatable; fnmatch).",
        flag="allow_thread",
        multiple=True,
    ),
    _server_option(
        "fork_guards",
        bool,
        "With threads in the zygote, hold logging, OpenSSL, the resolver, prevent_fork()"
        " sections and fork_lock()s across each fork (--no-fork-guards: only to compare).",
    ),
    _server_option(
        "fork_guard_timeout",
        float,
        "Seconds a fork waits for threads to leave the fork guards before it forks anyway.",
    ),
    _server_option(
        "exit_timeout", float, "Seconds a worker's before_exit hooks get, all together."
    ),
    _server_option(
        "corrupt_limit", click.IntRange(1), "Corrupt children in a row that retire a zygote."
    ),
    _server_option(
        "zygote_failure_limit",
        click.IntRange(1),
        "Failed zygotes in a row that stop the server.",
    ),
    _server_option("fork_timeout", float, "Seconds the zygote has to answer a fork request."),
    _server_option("spawn_retries", click.IntRange(0), "Failed starts retried per request."),
    _server_option("kill_grace", float, "Seconds from SIGTERM to SIGKILL."),
    _server_option("shutdown_grace", float, "Seconds running workers get on stop."),
    _server_option("boot_timeout", float, "Seconds a zygote has to preload."),
    _server_option("result_ttl", float, "Seconds a result no client has confirmed is kept."),
    _server_option("max_results", click.IntRange(1), "Unconfirmed results kept at most."),
    _server_option(
        "max_results_bytes", click.IntRange(1), "Bytes of unconfirmed results kept at most."
    ),
    _server_option("max_message_bytes", click.IntRange(1024), "Largest request or result."),
    _server_option(
        "log_level",
        click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
        "Log level.",
    ),
    _server_option(
        "refork_after",
        str,
        "Refork after N[,N...] spawns in a generation: the next worker to finish its "
        "task becomes the next zygote (the last number repeats). [default: off]",
    ),
    _server_option(
        "refork_timeout", float, "Seconds an on-demand refork waits for a finished task."
    ),
    _server_option(
        "curve_secret",
        click.Path(dir_okay=False),
        "The server's secret key, NAME.key_secret from `zygote keygen` (CURVE).",
    ),
    _server_option(
        "curve_clients",
        click.Path(file_okay=False),
        "Directory of the public keys (NAME.key) of the clients let in (CURVE).",
    ),
    _server_option(
        "insecure",
        bool,
        "Allow a tcp endpoint without CURVE: anyone who reaches it runs code as this user.",
    ),
    _server_option(
        "allow_tasks",
        str,
        "Tasks clients may spawn, fnmatch on module:qualname (repeatable) [default: any on"
        " ipc; on tcp the preloaded modules' own]",
        flag="allow_task",
        multiple=True,
    ),
    _server_option(
        "cgroups",
        bool,
        "Kill what each job leaves behind with a cgroup v2 per worker where the hierarchy is"
        " writable (--no-cgroups: process groups and orphan sweeps only).",
    ),
    _server_option(
        "worker_memory",
        str,
        "Memory a worker may use beyond what it shares with its zygote, in bytes (or 512M,"
        " 2G): cgroup memory.max with a memory controller, else RLIMIT_AS. [default: none]",
    ),
    _server_option(
        "worker_cpu_seconds",
        click.FloatRange(min=0, min_open=True),
        "CPU seconds a task may use (RLIMIT_CPU). [default: none]",
    ),
    _server_option(
        "worker_nofile",
        click.IntRange(1),
        "Open files a worker may have (RLIMIT_NOFILE). [default: none]",
    ),
    _server_option(
        "user",
        str,
        "Run the zygotes and workers as this user (the supervisor stays root). [default: ours]",
    ),
    _server_option("group", str, "... and this group. [default: the user's own group]"),
    _server_option(
        "metrics",
        str,
        "Serve Prometheus metrics at http://HOST:PORT/metrics (counts only; needs "
        "pip install 'zygote[metrics]') [default: off]",
    ),
    _server_option(
        "pidfile",
        click.Path(dir_okay=False),
        "Write the server's pid to this file once it listens; removed on exit. A file"
        " naming another live process stops the start.",
    ),
    _server_option(
        "log_file",
        click.Path(dir_okay=False),
        "Append the log lines of every process of the server to this file instead of"
        " stderr (reopened when logrotate moves it).",
    ),
    _server_option(
        "log_format",
        click.Choice(["text", "json"]),
        "Log lines as text, or as one JSON object each (time, level, logger, pid, message, exc).",
    ),
]


config_file_option = click.option(
    "--config",
    type=click.Path(dir_okay=False),
    envvar="ZYGOTE_CONFIG",
    is_eager=True,
    expose_value=False,
    callback=_load_config_file,
    help="TOML file of settings (keys as the long options, e.g. max-workers = 8).",
)

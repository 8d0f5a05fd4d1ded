"""The `zygote` command (also `python -m zygote`)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from .config import ConfigError, ServerConfig, load_toml, setup_logging
from .errors import ServerUnavailable, TaskError, ZygoteError, ZygoteTimeout

_DEFAULTS = ServerConfig(endpoint="ipc://(default)")
#: Options whose help says their default itself.
_NO_DEFAULT = ("worker_memory", "worker_cpu_seconds", "worker_nofile", "user", "group")


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
    elif name not in ("endpoint", "refork_after", *_NO_DEFAULT) and not extra.get("multiple"):
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
        help=help,
        **extra,
    )


_SERVER_OPTIONS = [
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
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="zygote")
def main() -> None:
    """zygote: a fork server for Python batch workers."""


@main.command()
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    envvar="ZYGOTE_CONFIG",
    is_eager=True,
    expose_value=False,
    callback=_load_config_file,
    help="TOML file of settings (keys as the long options, e.g. max-workers = 8).",
)
def start(**options: Any) -> None:
    """Start a server in the foreground; stop it with `zygote stop` or SIGTERM."""
    settings: dict[str, Any] = {
        name: list(value) if isinstance(value, tuple) else value
        for name, value in options.items()
        if value is not None and value != ()
    }
    try:
        config = ServerConfig(**settings)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    except TypeError as exc:
        raise click.UsageError(f"bad setting: {exc}") from None
    try:
        from .server.supervisor import EXIT_CONFIG, Supervisor
    except ImportError as exc:  # zygote.linux refuses other platforms
        raise click.ClickException(str(exc)) from None
    logger = setup_logging(config.log_level)
    try:
        code = Supervisor(config).run()
    except ConfigError as exc:
        logger.error("%s", exc)
        code = EXIT_CONFIG
    sys.exit(code)


for _option in _SERVER_OPTIONS:  # options added to a Command append in order
    start = _option(start)


def _parse_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


_endpoint_option = click.option(
    "--endpoint", envvar="ZYGOTE_ENDPOINT", show_envvar=True, help="Server endpoint."
)


@main.command()
@click.argument("task")
@click.argument("args", nargs=-1)
@click.option(
    "--kw",
    "kwargs",
    multiple=True,
    metavar="NAME=VALUE",
    help="Keyword argument (repeatable); VALUE is read like ARG.",
)
@click.option("--timeout", type=float, help="Kill the task after this many seconds.")
@click.option("--profile", help="The zygote lineage to fork it from (start --profile).")
@_endpoint_option
def spawn(
    task: str,
    args: tuple[str, ...],
    kwargs: tuple[str, ...],
    timeout: float | None,
    profile: str | None,
    endpoint: str | None,
) -> None:
    """Run TASK ("package.module:function") with ARGs and print its result as JSON.

    Each ARG is read as JSON when it parses as JSON (5, 2.5, true, [1,2],
    {"a":1}, "\\"quoted\\""), else taken as a string.
    """
    from .client import Zygote

    keywords = {}
    for item in kwargs:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise click.BadParameter(f"expected NAME=VALUE, not {item!r}", param_hint="--kw")
        keywords[name] = _parse_arg(value)
    try:
        with Zygote(endpoint) as client:
            handle = client.spawn(
                task, *map(_parse_arg, args), _timeout=timeout, _profile=profile, **keywords
            )
            value = handle.result()
    except TaskError as exc:
        if exc.remote_traceback:
            click.echo(exc.remote_traceback.rstrip(), err=True)
        raise click.ClickException(f"task failed: {exc}") from None
    except (ZygoteError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(value, default=repr))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the raw stats as JSON.")
@_endpoint_option
def status(as_json: bool, endpoint: str | None) -> None:
    """Show the server's state: zygote, workers, queue, counters."""
    from .client import Zygote

    try:
        with Zygote(endpoint, timeout=10.0) as client:
            stats = client.stats()
    except ZygoteError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(stats, indent=2, sort_keys=True))
        return
    width = max(len(key) for key in stats)
    for key, value in stats.items():
        if isinstance(value, float):
            value = f"{value:.1f}"
        elif isinstance(value, (list, dict)):
            value = json.dumps(value)
        click.echo(f"{key.replace('_', ' '):<{width}}  {value}")


@main.command()
@click.option(
    "--timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds to wait for the new generation to serve.",
)
@click.option("--profile", help="The lineage to refork [default: the default one].")
@_endpoint_option
def refork(timeout: float, profile: str | None, endpoint: str | None) -> None:
    """Promote a warm worker to be the next zygote generation: the next
    worker to finish its task becomes a zygote (its imports and caches warm),
    and takes over once a child of it passed the validators."""
    from .client import Zygote

    try:
        with Zygote(endpoint, timeout=timeout) as client:
            click.echo(f"generation {client.refork(profile)} serving")
    except ZygoteError as exc:
        raise click.ClickException(f"refork failed: {exc}") from None


@main.command()
@click.option("--wait/--no-wait", default=True, help="Wait until the new generation serves.")
@click.option(
    "--timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds to wait for the new generation.",
)
@click.option("--profile", help="The lineage to reload [default: every one].")
@_endpoint_option
def reload(wait: bool, timeout: float, profile: str | None, endpoint: str | None) -> None:
    """Start the next zygote generation from a fresh interpreter (your code
    imported again); it takes over once a child of it passed the validators,
    and the old one and its ready pool are retired. Every profile's, or one's."""
    from .client import Zygote

    try:
        with Zygote(endpoint, timeout=10.0) as client:
            client.reload(profile)
            profiles = client.stats()["profiles"]
            # The generation each reload will have (after a refork in flight, if any).
            expected = {
                name: (p["incoming_generation"] or 0) + bool(p["reload_pending"])
                for name, p in profiles.items()
                if profile in (None, name)
            }
            for name, generation in expected.items():
                if not generation:  # the system refused to start it (see the server's log)
                    raise click.ClickException(f"{_lineage(name)}the reload could not start")
                click.echo(f"{_lineage(name)}generation {generation} starting")
            deadline = time.monotonic() + timeout
            while wait and expected:
                profiles = client.stats()["profiles"]
                for name, generation in list(expected.items()):
                    p = profiles[name]
                    if p["generation"] >= generation and p["zygote_state"] == "ready":
                        click.echo(f"{_lineage(name)}generation {generation} serving")
                        del expected[name]
                    elif p["incoming_generation"] is None and not p["reload_pending"]:
                        raise click.ClickException(
                            f"{_lineage(name)}generation {generation} failed to start; generation "
                            f"{p['generation']} keeps serving (see the server's log)"
                        )
                if expected and time.monotonic() > deadline:
                    raise click.ClickException(f"not serving after {timeout:g}s: {expected}")
                time.sleep(0.1)
    except ZygoteError as exc:
        raise click.ClickException(str(exc)) from None


def _lineage(profile: str) -> str:
    return "" if profile == "default" else f"[{profile}] "


@main.command()
@click.option("--wait/--no-wait", default=True, help="Wait until the server has exited.")
@click.option(
    "--timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds to wait for the server to exit.",
)
@_endpoint_option
def stop(wait: bool, timeout: float, endpoint: str | None) -> None:
    """Stop the server gracefully: queued requests get an error, running
    workers finish (within the server's shutdown grace)."""
    from .client import Zygote

    server: int | None = None
    try:
        with Zygote(endpoint, timeout=10.0) as client:
            if wait and client.endpoint.startswith("ipc://"):
                # On this machine: wait for the process itself to end. Its
                # socket goes a little before it does.
                with contextlib.suppress(OSError):
                    server = os.pidfd_open(int(client.stats()["pid"]))
            client.stop()
    except ZygoteError as exc:
        raise click.ClickException(str(exc)) from None
    if server is not None:
        ended = select.poll()
        ended.register(server, select.POLLIN)
        gone = ended.poll(int(timeout * 1000))
        os.close(server)
        if not gone:
            raise click.ClickException(f"the server is still running after {timeout:g}s")
        return
    deadline = time.monotonic() + timeout
    while wait:
        try:
            with Zygote(endpoint, timeout=1.0) as client:
                client.ping()
        except (ServerUnavailable, ZygoteTimeout):
            return
        if time.monotonic() > deadline:
            raise click.ClickException(f"the server is still running after {timeout:g}s")
        time.sleep(0.1)

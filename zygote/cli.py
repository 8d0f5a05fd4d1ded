"""The `zygote` command (also `python -m zygote`)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from . import __version__
from .cli_jobs import COMMANDS, endpoint_option
from .config import ConfigError, ServerConfig, default_endpoint, setup_logging
from .errors import ServerUnavailable, ZygoteError, ZygoteTimeout
from .options import SERVER_OPTIONS, config_file_option

if TYPE_CHECKING:
    from .client import Zygote


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="zygote")
def main() -> None:
    """zygote: a fork server for Python batch workers."""


@main.command()
@config_file_option
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
    try:
        logger = setup_logging(config.log_level, config.log_file, config.log_format)
    except OSError as exc:
        raise click.UsageError(f"cannot open the log file: {exc}") from None
    try:
        code = Supervisor(config).run()
    except ConfigError as exc:
        logger.error("%s", exc)
        code = EXIT_CONFIG
    sys.exit(code)


for _option in SERVER_OPTIONS:  # options added to a Command append in order
    start = _option(start)


for _command in COMMANDS:
    main.add_command(_command)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", required=True, help="The key's name: writes NAME.key and NAME.key_secret.")
def keygen(directory: str, name: str) -> None:
    """Make a CURVE key pair in DIRECTORY for a tcp endpoint: NAME.key (public,
    to hand out) and NAME.key_secret (keep it; both mode 0600)."""
    from .keys import generate

    try:
        public, secret = generate(directory, name)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {public} and {secret}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the raw stats as JSON.")
@endpoint_option
def status(as_json: bool, endpoint: str | None) -> None:
    """Show the server's state: zygote, workers, queue, counters."""
    from .client import Zygote

    try:
        with Zygote(endpoint, timeout=10.0) as client:
            asked = time.monotonic()
            stats = client.stats()
            # The memory figures are read in the background (every 10 s when
            # nobody asks); asking woke the reader if they were old: wait a
            # little for figures read since.
            while "memory" in stats and time.monotonic() - asked < 3.0:  # (an older server's: no)
                age = stats["memory"]["age"]
                if age is not None and (age <= 1.0 or age < time.monotonic() - asked):
                    break
                time.sleep(0.1)
                stats = client.stats()
    except ZygoteError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(stats, indent=2, sort_keys=True))
        return
    lines = [(key.replace("_", " "), _value(key, value, stats)) for key, value in stats.items()]
    profiles = stats.get("profiles") or {}
    if len(profiles) > 1:  # each lineage's own figures; with one, they are the above
        for name, figures in profiles.items():
            shown = (f"{k.replace('_', ' ')} {_value(k, v, figures)}" for k, v in figures.items())
            lines.append((f"profile {name}", ", ".join(x for x in shown if not x.endswith(" -"))))
    width = max(len(key) for key, _ in lines)
    for key, value in lines:
        if key != "profiles":
            click.echo(f"{key:<{width}}  {value}")


def _value(key: str, value: Any, stats: dict[str, Any]) -> str:
    """One figure of `zygote status` for people: with its unit, "-" for none."""
    if key == "helper_pss" and stats.get("helper_pid") is None:
        return "no helper"
    if key.endswith(("_rss", "_pss", "_bytes")) and isinstance(value, int | None):
        return _size(value) if value is not None else "-"
    if key == "memory" and isinstance(value, dict):
        return _memory(value)
    if value is None or value == [] or value == {}:
        return "-"
    if key == "uptime" or key.endswith("_seconds"):
        return f"{value:.1f} s"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


def _size(count: int | None) -> str:
    """Bytes for people: "12.3 MiB"."""
    if count is None:
        return "not read yet"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{count} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _memory(memory: dict[str, Any]) -> str:
    """The memory section: the total PSS, then one line per worker."""
    age = "never read" if memory["age"] is None else f"read {memory['age']:.1f} s ago"
    lines = [
        f"total PSS {_size(memory['total_pss'])} (supervisor {_size(memory['supervisor_pss'])}"
        f", zygotes and helpers above, {len(memory['workers'])} workers below; {age})"
    ]
    for worker in memory["workers"]:
        lines.append(
            f"  worker {worker['pid']} ({worker['profile']}, {worker['state']}): "
            f"USS {_size(worker['uss'])}, PSS {_size(worker['pss'])}, RSS {_size(worker['rss'])}"
        )
    return "\n".join(lines)


@main.command()
@click.option(
    "--timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds to wait for the new generation to serve.",
)
@click.option("--profile", help="The lineage to refork [default: the default one].")
@endpoint_option
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
@endpoint_option
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
@endpoint_option
def stop(wait: bool, timeout: float, endpoint: str | None) -> None:
    """Stop the server gracefully: queued requests get an error, running
    workers finish (within the server's shutdown grace). With no server
    running there is nothing to do: that is a success too."""
    from .client import Zygote

    server: int | None = None
    deadline = time.monotonic() + timeout
    try:
        client = Zygote(endpoint, timeout=10.0)
    except ServerUnavailable:  # not even its socket file
        click.echo(f"no server running at {endpoint or default_endpoint()}")
        return
    except ZygoteError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        with client:
            try:
                pid = int(client.stats()["pid"])
            except ServerUnavailable:
                click.echo(f"no server running at {client.endpoint}")
                return
            if wait and client.endpoint.startswith("ipc://"):
                # On this machine: wait for the process itself to end. Its
                # socket goes a little before it does.
                with contextlib.suppress(OSError):
                    server = os.pidfd_open(pid)
            client.stop()
            if wait:
                _show_running_jobs(client, server, deadline)
    except ZygoteError as exc:
        raise click.ClickException(str(exc)) from None
    if server is not None:
        ended = select.poll()
        ended.register(server, select.POLLIN)
        gone = ended.poll(max(0, int((deadline - time.monotonic()) * 1000)))
        os.close(server)
        if not gone:
            raise click.ClickException(f"the server is still running after {timeout:g}s")
        return
    while wait:
        try:
            with Zygote(endpoint, timeout=1.0) as client:
                client.ping()
        except (ServerUnavailable, ZygoteTimeout):
            return
        if time.monotonic() > deadline:
            raise click.ClickException(f"the server is still running after {timeout:g}s")
        time.sleep(0.1)


def _show_running_jobs(client: Zygote, server: int | None, deadline: float) -> None:
    """While the stopping server's jobs finish: "waiting for 3 running
    jobs..." on stderr, again each time the number changes. Returns once
    none is left, the server is gone, or at the deadline."""
    shown = None
    ended = select.poll()
    if server is not None:
        ended.register(server, select.POLLIN)
    while time.monotonic() < deadline:
        # Its exit first: once it has closed its socket, on its way out, a
        # question would wait out the client's silence probes (about 5 s).
        if ended.poll(200):  # (or a plain pause without a pidfd)
            return
        try:
            running = int(client.stats()["workers"])
        except ZygoteError:  # it has closed its socket: on its way out
            return
        if not running:
            return
        if running != shown:
            s = "" if running == 1 else "s"
            click.echo(f"waiting for {running} running job{s}\u2026", err=True)
            shown = running

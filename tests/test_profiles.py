"""Named profiles: one zygote lineage per preload set, each with its own
generations and ready pool, sharing the worker slots."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from zygote import Handle, SpawnError

from .conftest import Server, wait_until, zygote_cli


def _both_ready(server: Server) -> bool:
    profiles = server.stats()["profiles"]
    return all(p["zygote_state"] == "ready" for p in profiles.values())


def test_a_profile_has_its_own_preload(start_server: Callable[..., Server]) -> None:
    server = start_server("--profile", "heavy=tests.heavy_app,json")
    wait_until(lambda: _both_ready(server), what="both lineages")
    client = server.client(timeout=30)
    assert client.spawn("tests.tasks:loaded", "tests.heavy_app").result() is False
    heavy = client.spawn("tests.tasks:loaded", "tests.heavy_app", _profile="heavy")
    assert heavy.result() is True
    assert client.spawn("tests.heavy_app:size", _profile="heavy").result() == 1000
    profiles = server.stats()["profiles"]
    assert set(profiles) == {"default", "heavy"}
    assert profiles["heavy"]["zygote_pid"] != profiles["default"]["zygote_pid"]
    assert profiles["heavy"]["generation_spawns"] == 2
    # The CLI, and map(), pick a profile too.
    proc = zygote_cli(
        "spawn",
        "--profile",
        "heavy",
        "tests.tasks:loaded",
        "tests.heavy_app",
        "--endpoint",
        server.endpoint,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "true", proc.stderr
    assert (
        list(client.map("tests.tasks:loaded", ["tests.heavy_app"] * 3, profile="heavy"))
        == [True] * 3
    )


def test_an_unknown_profile_is_a_clear_error(start_server: Callable[..., Server]) -> None:
    server = start_server("--profile", "heavy=tests.heavy_app")
    client = server.client(timeout=30)
    with pytest.raises(SpawnError, match="unknown profile 'light': this server has default, heavy"):
        client.spawn("tests.tasks:add", 1, 2, _profile="light")
    assert client.spawn("tests.tasks:add", 1, 2).result() == 3


def test_profiles_share_the_worker_slots(start_server: Callable[..., Server], tmp_path) -> None:
    server = start_server("--max-workers", "2", "--profile", "heavy=tests.heavy_app")
    wait_until(lambda: _both_ready(server), what="both lineages")
    client = server.client(timeout=30)
    gate = tmp_path / "go"
    running = [
        client.spawn("tests.tasks:wait_for_file", str(gate)),
        client.spawn("tests.tasks:wait_for_file", str(gate), _profile="heavy"),
    ]
    client_two = server.client(timeout=30)
    queued: list[Handle] = []
    spawner = threading.Thread(
        target=lambda: queued.append(client_two.spawn("tests.tasks:add", 1, 1, _profile="heavy"))
    )
    spawner.start()
    wait_until(lambda: server.stats()["queued"] == 1, what="a third job queued")
    assert server.stats()["workers"] == 2  # one per lineage: the two slots
    gate.write_text("")
    spawner.join(30)
    assert [h.result() for h in running] == [h.pid for h in running]
    assert queued[0].result() == 2


def test_a_profile_reforks_and_reloads_on_its_own(start_server: Callable[..., Server]) -> None:
    server = start_server(
        "--prefork", "0", "--profile", "heavy=tests.heavy_app", preload=("tests.tasks",)
    )
    wait_until(lambda: _both_ready(server), what="both lineages")
    client = server.client(timeout=30)
    assert client.reload(profile="heavy") == 2
    wait_until(
        lambda: server.stats()["profiles"]["heavy"]["generation"] == 2, what="heavy generation 2"
    )
    assert server.stats()["profiles"]["default"]["generation"] == 1
    handle = client.spawn("tests.heavy_app:size", _profile="heavy")
    assert handle.generation == 2 and handle.result() == 1000
    assert "[heavy] generation 2 takes over from 1" in server.log()


def test_profiles_from_a_toml_file(start_server: Callable[..., Server], tmp_path) -> None:
    config = tmp_path / "zygote.toml"
    config.write_text('[profiles]\nheavy = ["tests.heavy_app"]\nlight = "json"\n')
    server = start_server("--config", str(config))
    assert set(server.stats()["profiles"]) == {"default", "heavy", "light"}
    client = server.client(timeout=30)
    assert client.spawn("tests.heavy_app:size", _profile="heavy").result() == 1000

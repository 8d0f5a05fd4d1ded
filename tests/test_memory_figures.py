"""Memory figures in `stats()` and `zygote status`: RSS and PSS of each
profile's zygote, USS/PSS/RSS of each worker, the total PSS
(zygote/server/memory.py, zygote.linux.memory_usage)."""

from __future__ import annotations

import signal

from zygote.linux import memory_usage

from .conftest import Server, wait_until, zygote_cli


def test_memory_usage_of_this_process() -> None:
    memory = memory_usage()
    assert memory is not None and 0 < memory.uss <= memory.pss <= memory.rss
    assert memory_usage(2**22 + 1) is None  # above pid_max: no such process


def test_stats_and_status_give_memory_figures(shared_server: Server) -> None:
    client = shared_server.client(timeout=30)
    handle = client.spawn("tests.tasks:sleep", 60)

    def figures():
        stats = shared_server.stats()
        workers = {w["pid"]: w for w in stats["memory"]["workers"]}
        read = handle.pid in workers and stats["zygote_pss"] is not None
        return stats if read and workers[handle.pid]["state"] == "running" else None

    stats = wait_until(figures, timeout=15, what="the running worker's figures")
    memory = stats["memory"]
    assert 0 < stats["zygote_pss"] <= stats["zygote_rss"]
    assert stats["profiles"]["default"]["zygote_pss"] == stats["zygote_pss"]
    for worker in memory["workers"]:
        assert 0 < worker["uss"] <= worker["pss"] <= worker["rss"]
        assert worker["profile"] == "default"
    assert stats["helper_pss"] is None  # no background functions: no helper
    parts = [memory["supervisor_pss"], stats["zygote_pss"]]
    parts += [w["pss"] for w in memory["workers"]]
    assert memory["total_pss"] == sum(parts)
    assert 0 <= memory["age"] < 15

    proc = zygote_cli("status", "--endpoint", shared_server.endpoint)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split("  ")[0]: line for line in proc.stdout.splitlines()}
    assert lines["zygote pss"].endswith("MiB")
    assert lines["helper pss"].endswith("no helper")
    assert "total PSS" in lines["memory"] and "MiB" in lines["memory"]
    assert f"worker {handle.pid} (default, running): USS " in proc.stdout
    handle.kill(signal.SIGKILL)

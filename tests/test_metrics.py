"""`zygote start --metrics`: Prometheus metrics scraped over HTTP from a live
server (zygote/server/metrics.py)."""

from __future__ import annotations

import json
import re
import signal
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from zygote import TaskError, WorkerLost

from .conftest import REPO, Server, wait_until, zygote_cli


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """sample name -> {sorted labels: value}, parsed by prometheus_client."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_metrics_count_spawns_by_outcome_over_http(start_server) -> None:
    server: Server = start_server("--metrics", "127.0.0.1:0", "--prefork", "1")
    url = server.stats()["metrics"]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
    client = server.client(timeout=30)
    assert client.spawn("tests.tasks:add", 2, 3).result() == 5
    with pytest.raises(TaskError):
        client.spawn("tests.tasks:raise_value_error").result()
    doomed = client.spawn("tests.tasks:sleep", 60)
    wait_until(lambda: scrape(url)["zygote_workers"][()] == 1, what="a running worker")
    assert doomed.kill(signal.SIGKILL)
    with pytest.raises(WorkerLost):
        doomed.result(timeout=15)

    metrics = scrape(url)
    spawns = {
        dict(labels)["outcome"]: value for labels, value in metrics["zygote_spawns_total"].items()
    }
    assert spawns == {
        "ok": 1,
        "raised": 1,
        "killed": 1,
        "exited": 0,
        "lost": 0,
        "timeout": 0,
        "failed_start": 0,
        "shutdown": 0,
    }
    assert metrics["zygote_spawn_duration_seconds_count"][()] == 3
    assert 0 < metrics["zygote_spawn_duration_seconds_sum"][()] < 30
    assert metrics["zygote_spawn_duration_seconds_bucket"][(("le", "+Inf"),)] == 3
    assert metrics["zygote_workers"][()] == 0
    assert metrics["zygote_queue_depth"][()] == 0
    assert metrics["zygote_generation"][(("profile", "default"),)] == 1
    assert metrics["zygote_zygote_restarts_total"][(("profile", "default"),)] == 0
    assert metrics["zygote_pool_ready"][(("profile", "default"),)] in (0, 1)
    assert "zygote_validator_failures_total" not in metrics  # none failed: no series

    # Only /metrics (or /) is served; a HEAD gets the headers alone.
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(url.replace("/metrics", "/jobs"), timeout=10)
    assert missing.value.code == 404
    head = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(head, timeout=10) as response:
        assert response.status == 200 and response.read() == b""


def test_metrics_count_validator_failures_by_name(start_server, tmp_path) -> None:
    server = start_server(
        "--metrics",
        "127.0.0.1:0",
        preload=("tests.tasks", "tests.flaky_validator"),
        env={"ZYGOTE_TEST_DIR": str(tmp_path)},
    )
    url = server.stats()["metrics"]
    failures = wait_until(
        lambda: scrape(url).get("zygote_validator_failures_total"), what="a validator failure"
    )
    assert failures == {(("validator", "flaky"),): 1}


def test_metrics_without_prometheus_client_is_a_clear_error(start_server, tmp_path) -> None:
    fake = tmp_path / "prometheus_client"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('not installed')\n")
    server = start_server("--metrics", "127.0.0.1:0", env={"PYTHONPATH": str(tmp_path)}, wait=False)
    assert server.wait_exit(30) == 2
    assert "--metrics needs prometheus_client: pip install 'zygote[metrics]'" in server.log()


def test_metrics_address_names_a_host(tmp_path: Path) -> None:
    proc = zygote_cli("start", "--endpoint", f"ipc://{tmp_path}/s", "--metrics", ":9464")
    assert proc.returncode == 2
    assert "metrics address is HOST:PORT" in proc.stderr


def test_grafana_dashboard_uses_the_served_metrics() -> None:
    dashboard = json.loads((REPO / "examples" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\bzygote_\w+", expr)}
    served = {
        "zygote_spawns_total",
        "zygote_spawn_duration_seconds_bucket",
        "zygote_workers",
        "zygote_queue_depth",
        "zygote_pool_ready",
        "zygote_validator_failures_total",
        "zygote_zygote_restarts_total",
        "zygote_generation",
    }
    assert used == served

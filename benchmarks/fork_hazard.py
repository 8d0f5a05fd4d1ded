"""How often children of a zygote with OpenSSL threads hang, and how many the
validators catch before the task runs.

    python -m benchmarks.fork_hazard [-n 2000] [--validate-timeout 1]

The zygote preloads examples.openssl_threads (two threads looping on
ssl.create_default_context() and hashlib.pbkdf2_hmac). Each job runs a task
that uses OpenSSL itself (a TLS context and a digest), with a per-task
timeout. Run with validators on and off (and, with --variants, with each
half of the openssl probe alone): a hang caught at start-up is a child
killed and replaced (the client never sees it); a hang that got past
start-up shows as a task timeout.
"""

from __future__ import annotations

import argparse
import collections
import json

from zygote import TaskTimeout, Zygote, ZygoteError

from .common import machine, zygote_server

PRELOAD = ("examples.openssl_threads",)
OFF = [
    arg
    for name in ("openssl", "logging", "stdio", "resolver")
    for arg in ("--disable-validator", name)
]


def run(n: int, validate_timeout: float, task_timeout: float, options: list[str]) -> dict:
    outcomes: collections.Counter[str] = collections.Counter()
    with (
        zygote_server(
            "--max-workers",
            "4",
            "--validate-timeout",
            str(validate_timeout),
            "--corrupt-limit",
            "50",
            *options,
            preload=PRELOAD,
        ) as endpoint,
        Zygote(endpoint, timeout=120) as client,
    ):
        window: collections.deque = collections.deque()

        def collect() -> None:
            try:
                window.popleft().result()
                outcomes["ok"] += 1
            except TaskTimeout:
                outcomes["hung in the task (timeout)"] += 1
            except ZygoteError as exc:
                outcomes[f"error: {type(exc).__name__}"] += 1

        for i in range(n):
            try:
                window.append(
                    client.spawn("examples.openssl_threads:digest", str(i), _timeout=task_timeout)
                )
            except ZygoteError as exc:
                outcomes[f"spawn error: {type(exc).__name__}"] += 1
            if len(window) >= 4:
                collect()
        while window:
            collect()
        stats = client.stats()
    return {
        "outcomes": dict(outcomes),
        "caught at start-up and replaced": stats["failed_starts"],
        "by step": stats["validator_failures"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--validate-timeout", type=float, default=1.0)
    parser.add_argument("--task-timeout", type=float, default=3.0)
    parser.add_argument(
        "--variants", action="store_true", help="also run the openssl probe's halves on their own"
    )
    args = parser.parse_args()
    configurations = {
        "validators on": [],
        "validators off": OFF,
        # The openssl probe's two halves on their own, as custom validators.
        "only RAND + digest fetch": [*OFF, "--validator", "benchmarks.probes:rand_and_fetch"],
        "only SSLContext": [*OFF, "--validator", "benchmarks.probes:context"],
    }
    if not args.variants:
        configurations = dict(list(configurations.items())[:2])
    report = {
        name: run(args.n, args.validate_timeout, args.task_timeout, options)
        for name, options in configurations.items()
    }
    print(f"# {machine()}; n={args.n} per run")
    print(json.dumps(report, indent=2))
    for name, result in report.items():
        hung = result["outcomes"].get("hung in the task (timeout)", 0)
        caught = result["caught at start-up and replaced"]
        print(
            f"{name}: {caught} caught at start-up ({caught / args.n:.2%}), "
            f"{hung} hung in the task ({hung / args.n:.2%}), "
            f"{result['outcomes'].get('ok', 0)} ok"
        )


if __name__ == "__main__":
    main()

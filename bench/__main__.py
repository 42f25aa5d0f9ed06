"""Run the benchmarks: `.venv/bin/python -m bench [--only accept,delivery] [--quick]`.

Starts embedded Postgres + Redis (or uses CASCADE_DATABASE_URL / CASCADE_REDIS_URL),
migrates a fresh database, runs the real `cascade api` / `cascade worker` processes on
127.0.0.1 and prints every figure next to its same-run baseline. Bounded: each
measurement stops after `--seconds`, each backlog at its count.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import uvloop

from bench import scenarios
from bench.scenarios import Figure
from bench.stack import Stack

ALL = ("accept", "batch", "delivery", "callbacks", "isolation", "scale")


def machine() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as info:
        memory = int(info.readline().split()[1]) / 1024 / 1024
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, {platform.system()}"
        f" {platform.release()}, Python {platform.python_version()};"
        f" load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
    )


def table(figures: list[Figure]) -> str:
    lines = [
        "| figure | value | baseline | ratio | target | met? | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        value = "pending" if math.isnan(f.value) else f"{f.value:,.1f} {f.unit}"
        baseline = "" if f.baseline is None else f"{f.baseline:,.1f} {f.unit}"
        ratio = "" if f.ratio is None else f"{f.ratio:.0%}"
        met = {True: "yes", False: "**no**", None: "—"}[f.met]
        lines.append(
            f"| {f.name} | {value} | {baseline} | {ratio} | {f.target} | {met} | {f.note} |"
        )
    return "\n".join(lines)


async def run(args: argparse.Namespace, stack: Stack) -> list[Figure]:
    figures: list[Figure] = []
    empty_rate: float | None = None
    chosen = args.only.split(",") if args.only else list(ALL)
    for name in chosen:
        print(f"== {name} (load average {os.getloadavg()[0]:.2f})", flush=True)
        started = time.monotonic()
        if name == "accept":
            result = await scenarios.accept(stack, args.seconds, tuple(args.api_workers))
            empty_rate = result.rate.get(1)
            figures += result.figures
        elif name == "batch":
            figures += await scenarios.batch(stack, args.seconds)
        elif name == "delivery":
            figures += await scenarios.delivery(stack, args.messages, within=180)
        elif name == "callbacks":
            figures += await scenarios.callbacks(stack, args.messages, args.seconds, within=180)
        elif name == "isolation":
            figures += await scenarios.isolation(
                stack, args.backlog, args.seconds * 2, drain_seconds=args.drain_seconds
            )
        elif name == "scale":
            figures += await scenarios.scale(
                stack, args.rows, args.fill_seconds, args.seconds, empty_rate
            )
        else:
            raise SystemExit(f"unknown benchmark {name!r}; choose from {', '.join(ALL)}")
        print(f"   ({time.monotonic() - started:.0f} s)", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(ALL)}")
    parser.add_argument("--seconds", type=float, default=10, help="per measurement")
    parser.add_argument("--messages", type=int, default=1500, help="delivery/callback count")
    parser.add_argument("--backlog", type=int, default=50_000, help="marketing backlog")
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=0,
        help="isolation: then drain the backlog to completion or this bound (0: don't)",
    )
    parser.add_argument("--rows", type=int, default=5_000_000, help="scale: ledger rows")
    parser.add_argument("--fill-seconds", type=float, default=180, help="scale: fill budget")
    parser.add_argument("--api-workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quick", action="store_true", help="small counts, short runs")
    parser.add_argument("--write", type=Path, help="append the table to this markdown file")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.messages, args.backlog, args.rows = 5, 1000, 5000, 200_000
    os.environ.setdefault("CASCADE_SANDBOX_DELAY", "PT0.001S")
    print(f"machine: {machine()}", flush=True)
    stack = Stack.start()
    try:
        figures = uvloop.run(run(args, stack))
    finally:
        stack.close()
    report = (
        f"### {datetime.now(UTC):%Y-%m-%d %H:%M} UTC — `python -m bench"
        f"{' --only ' + args.only if args.only else ''}{' --quick' if args.quick else ''}`\n\n"
        f"Machine at the end: {machine()}\n\n{table(figures)}\n"
    )
    print()
    print(report)
    if args.write:
        with args.write.open("a") as out:
            out.write("\n" + report)


if __name__ == "__main__":
    main()

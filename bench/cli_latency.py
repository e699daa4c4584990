"""CLI start-up: `resiso status` against a running daemon vs `python -c "import typer, rich"`.

The baseline is the least any Typer + Rich command can cost: the interpreter starting and
importing the two libraries. `resiso status` adds what it needs on top (the client and
pyzmq, Rich's tables, one request to the daemon, drawing) and should add no more than the
baseline costs again. Both run with the same interpreter, interleaved, in this run, so a
busy machine slows both alike; the ratio is what is compared.
Target: `resiso status` median <= 2x the baseline's median.

Children run without PYTHONDONTWRITEBYTECODE, as an installed CLI does: the warm-up runs
leave compiled bytecode behind, so no run pays for compiling the project's modules.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Daemon, median, table  # noqa: E402

NULL_CONFIG = """
[daemon]
heartbeat_ms = 200
[domains.null]
kind = "null"
workers = 1
"""
TARGET = 2.0


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU (user + system) milliseconds of one run. CPU time is what the command
    itself costs; wall time adds waiting for a core on a busy machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       cwd="/")
    took = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.decode()}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return took * 1000, cpu * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    py = sys.executable
    resiso = os.path.join(os.path.dirname(py), "resiso")
    commands = {
        "python -c 'import typer, rich' (baseline)": [py, "-c", "import typer, rich"],
        "resiso status": [py, resiso, "status"],
        "resiso status --json": [py, resiso, "status", "--json"],
    }
    with Daemon(NULL_CONFIG) as d:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["RESISO_SOCKET"] = d.socket
        for _ in range(args.warmup):
            for argv in commands.values():
                timed(argv, env)
        times: dict[str, list[float]] = {name: [] for name in commands}
        cpu: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.runs):  # interleaved: load changes hit every command alike
            for name, argv in commands.items():
                wall, used = timed(argv, env)
                times[name].append(wall)
                cpu[name].append(used)
    base, base_cpu = next(iter(times.values())), next(iter(cpu.values()))
    rows = [[name, f"{median(t):.1f}", f"{sum(t) / len(t):.1f}", f"{min(t):.1f}",
             f"{median(cpu[name]):.1f}", f"{median(t) / median(base):.2f}",
             f"{min(t) / min(base):.2f}", f"{median(cpu[name]) / median(base_cpu):.2f}"]
            for name, t in times.items()]
    print(table(f"CLI start-up, {args.runs} runs each, {os.cpu_count()} cores, "
                f"load average {os.getloadavg()[0]:.1f}",
                ["command", "median ms", "mean ms", "min ms", "cpu ms (median)",
                 "x baseline (median)", "x baseline (min)", "x baseline (cpu)"], rows))
    ratio = median(times["resiso status"]) / median(base)
    print(f"\nresiso status: {ratio:.2f}x the baseline (target <= {TARGET:.1f}x): "
          f"{'ok' if ratio <= TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()

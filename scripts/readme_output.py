"""Regenerate README.md's record of the main job: run the torchrun sweep exactly as README says and write its real
output, with the wall-clock time and the machine, between README's markers — so the table cannot drift from the code.

    python scripts/readme_output.py            # run the sweep (world 4, CPU/gloo) and rewrite README.md
    python scripts/readme_output.py --check    # run it and only compare (exit 1 naming the differing rows)

``--check`` compares what does not depend on the machine's speed: the header line, every row's config, degrees,
md5 and match column (md5s are reproducible on one machine; another CPU's BLAS may round differently).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
BEGIN, END = "<!-- readme_output.py: sweep begin -->", "<!-- readme_output.py: sweep end -->"
COMMAND = "torchrun --nproc-per-node 4 -m parallel.sweep"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_sweep() -> tuple[str, float]:
    """The sweep's stdout and its wall-clock seconds (process start-up included, as a user waits for it)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", *COMMAND.split()[1:]]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"readme_output: `{COMMAND}` failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc.stdout.strip("\n"), wall


def render(stdout: str, wall: float, when: str, machine: str) -> str:
    """The text between the markers: the command, its output verbatim, and where/when/how long."""
    return (f"{BEGIN}\n```\n$ {COMMAND}\n{stdout}\n```\n"
            f"Written by `python scripts/readme_output.py` on {when}: {machine}; {wall:.0f} s wall clock in all "
            f"(mostly starting 4 processes; `seconds` is each configuration's denoise).\n{END}")


def block(text: str) -> str:
    """README's current generated block (markers included)."""
    m = re.search(re.escape(BEGIN) + r".*?" + re.escape(END), text, flags=re.S)
    if m is None:
        raise SystemExit(f"readme_output: README.md has no {BEGIN} ... {END} block")
    return m.group(0)


def replace_block(text: str, new_block: str) -> str:
    old = block(text)
    return text.replace(old, new_block)


def rows(block_text: str) -> dict[str, tuple[str, ...]]:
    """config -> (degrees, md5, match) of every table row of a generated block (seconds left out)."""
    out = {}
    for line in block_text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and re.fullmatch(r"[0-9a-f]{32}", parts[-3]):
            out[parts[0]] = (" ".join(parts[1:-3]), parts[-3], parts[-2])
    return out


def header(block_text: str) -> str:
    return next((line for line in block_text.splitlines() if line.startswith("bagel-sweep:")), "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with README.md instead of rewriting it")
    args = ap.parse_args(argv)
    import torch

    stdout, wall = run_sweep()
    machine = f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()}, torch {torch.__version__}"
    new = render(stdout, wall, datetime.date.today().isoformat(), machine)
    with open(README) as f:
        text = f.read()
    old = block(text)
    if args.check:
        problems = []
        if header(old) != header(new):
            problems.append(f"header: README {header(old)!r} vs now {header(new)!r}")
        a, b = rows(old), rows(new)
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                problems.append(f"{name}: README {a.get(name)} vs now {b.get(name)}")
        if problems:
            print("README.md's sweep output is out of date (run python scripts/readme_output.py):\n  "
                  + "\n  ".join(problems))
            return 1
        print(f"README.md's sweep output is current ({len(b)} rows, {wall:.0f} s)")
        return 0
    with open(README, "w") as f:
        f.write(replace_block(text, new))
    print(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())

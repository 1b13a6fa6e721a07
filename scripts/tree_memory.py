"""The peak memory of a process tree, summed: every process's resident set (VmRSS) added up, sampled every
INTERVAL seconds until the tree ends. What "the suite's peak memory" means in the README: the pytest process and
the subprocesses it runs at the same moment, together.

    python scripts/tree_memory.py -- python -m pytest          # run a command and watch it
    python scripts/tree_memory.py --pid 1234                   # watch a running process and its descendants
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                parent = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        tree.setdefault(parent, []).append(int(entry))
    return tree


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next((int(line.split()[1]) for line in fh if line.startswith("VmRSS:")), 0)
    except OSError:
        return 0


def tree_rss(root: int) -> tuple[int, int]:
    """(summed, largest single) resident KiB of `root` and its descendants."""
    tree, todo, total, largest = _children(), [root], 0, 0
    while todo:
        pid = todo.pop()
        rss = _rss_kib(pid)
        total, largest = total + rss, max(largest, rss)
        todo.extend(tree.get(pid, []))
    return total, largest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pid", type=int, help="a running process to watch")
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("command", nargs="*")
    args = parser.parse_args()
    child = subprocess.Popen(args.command) if args.command else None
    root = child.pid if child else args.pid
    if root is None:
        parser.error("give a command (after --) or --pid")
    started, peak, peak_single, when = time.time(), 0, 0, 0.0
    while (child.poll() is None) if child else os.path.exists(f"/proc/{root}"):
        total, single = tree_rss(root)
        if total > peak:
            peak, when = total, time.time() - started
        peak_single = max(peak_single, single)
        time.sleep(args.interval)
    print(f"peak memory of the process tree: {peak / 2**20:.2f} GiB summed ({when / 60:.1f} min in), "
          f"largest single process {peak_single / 2**20:.2f} GiB; {time.time() - started:.0f} s watched",
          file=sys.stderr)
    return child.returncode if child else 0


if __name__ == "__main__":
    sys.exit(main())

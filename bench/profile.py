"""Summarise a py-spy ``--format raw`` profile (folded stacks): where the sampled time went.

    .venv/bin/python -m bench.profile /tmp/profile.txt [--top 20]

Prints the functions with the most samples on top of the stack (self) and anywhere in it
(inclusive), as shares of all samples. py-spy samples only threads that are running, so the
total is the process's busy time, not wall time.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path
from typing import Any

_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")
# The frames every sample of an asyncio program shares: not interesting as "inclusive" time.
_ROOTS = {"<module>", "main", "_worker", "run", "Runner.run", "run_until_complete"}


def _function(frame: str) -> str:
    """``name (path/file.py:123)`` -> ``name (path/file.py)``: lines of one function merge."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    name, where = match.groups()
    return f"{name} ({where})"


def summarize(path: Path, top: int = 20) -> dict[str, Any]:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        match = _LINE.match(line.strip())
        if match is None:
            continue
        stack, count = match.group(1), int(match.group(2))
        frames = [_function(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            if name.split(" (")[0] not in _ROOTS:
                inclusive[name] += count

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": name, "samples": n, "share": n / total if total else 0.0}
            for name, n in counter.most_common(top)
        ]

    return {"samples": total, "self": share(own), "inclusive": share(inclusive)}


def render(summary: dict[str, Any]) -> str:
    lines = [f"{summary['samples']} samples"]
    for key, title in (("self", "self (top of stack)"), ("inclusive", "inclusive")):
        lines.append(f"-- {title}")
        for row in summary[key]:
            lines.append(f"  {row['share'] * 100:5.1f}%  {row['function']}")
    return "\n".join(lines)


def cli() -> None:
    parser = argparse.ArgumentParser(prog="bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--top", type=int, default=20)
    opts = parser.parse_args()
    print(render(summarize(opts.path, opts.top)))


if __name__ == "__main__":
    cli()

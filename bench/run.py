"""Run the hutch benchmark suite: ``.venv/bin/python bench/run.py [--quick] [--repeat N]
[--json PATH]``. See bench/README.md."""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script from anywhere: make the repository root importable (`bench`, `service`).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":
    from bench.suite import main

    sys.exit(main())

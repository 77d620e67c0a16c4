"""Imported by the pool children of tests/test_pool.py's launch tests: the first child to
import it boots at once (or slowly); any other waits, fails its first boot, or notes what it
saw, as the environment says.

``HUTCH_TEST_LAUNCH_LOCK`` is a file the first importer holds a lock on for its life.
``HUTCH_TEST_LAUNCH_MODE`` is ``slow`` (the others take 1.5 s to boot), ``fail-once`` (the
first of the others raises; a later one boots) or ``first-slow`` (the first takes 1 s, then
creates ``<lock>.first-ready``; each other appends ``yes`` or ``no`` to ``<lock>.saw``: whether
that file was there when it booted).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

_lock_path = Path(os.environ["HUTCH_TEST_LAUNCH_LOCK"])
_mode = os.environ["HUTCH_TEST_LAUNCH_MODE"]
_first_ready = _lock_path.with_suffix(".first-ready")
_held = _lock_path.open("a")  # kept open: the lock lasts as long as this child
try:
    fcntl.flock(_held, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    if _mode == "slow":
        time.sleep(1.5)
    elif _mode == "first-slow":
        with _lock_path.with_suffix(".saw").open("a") as saw:
            saw.write("yes\n" if _first_ready.exists() else "no\n")
    else:
        failed = _lock_path.with_suffix(".failed")
        if not failed.exists():
            failed.touch()
            raise RuntimeError("this child was told to fail its first boot") from None
else:
    if _mode == "first-slow":
        time.sleep(1.0)
        _first_ready.touch()

"""Imported by the pool children of tests/test_pool.py's launch tests: the first child to
import it boots at once; any other waits, or fails its first boot, as the environment says.

``HUTCH_TEST_LAUNCH_LOCK`` is a file the first importer holds a lock on for its life.
``HUTCH_TEST_LAUNCH_MODE`` is ``slow`` (the others take 1.5 s to boot) or ``fail-once`` (the
first of the others raises; a later one boots).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

_lock_path = Path(os.environ["HUTCH_TEST_LAUNCH_LOCK"])
_held = _lock_path.open("a")  # kept open: the lock lasts as long as this child
try:
    fcntl.flock(_held, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    if os.environ["HUTCH_TEST_LAUNCH_MODE"] == "slow":
        time.sleep(1.5)
    else:
        failed = _lock_path.with_suffix(".failed")
        if not failed.exists():
            failed.touch()
            raise RuntimeError("this child was told to fail its first boot") from None

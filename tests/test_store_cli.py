"""``hutch store sweep``: a bad duration or no store is exit 2 with words; old blobs go."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from service.store import FileStore
from tests.conftest import ROOT


def sweep(*args: str, store: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUTCH_")}
    if store:
        env["HUTCH_STORE_URL"] = store
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "store", "sweep", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_bad_duration_and_missing_store_exit_2(tmp_path: Path) -> None:
    bad = sweep("--older-than", "7x", store=f"file://{tmp_path}")
    assert bad.returncode == 2 and "is not a duration" in bad.stderr
    none = sweep("--older-than", "7d", store=None)
    assert none.returncode == 2 and "HUTCH_STORE_URL" in none.stderr


def test_sweep_deletes_only_old_blobs(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path))
    old, new = store.put_bytes(b"old"), store.put_bytes(b"new")
    old_path = Path(store.check(old))
    week_ago = time.time() - 8 * 86400
    os.utime(old_path, (week_ago, week_ago))
    dry = sweep("--older-than", "7d", "--dry-run", store=f"file://{tmp_path}")
    assert dry.returncode == 0 and old_path.exists(), dry.stderr
    done = sweep("--older-than", "7d", "--json", store=f"file://{tmp_path}")
    assert done.returncode == 0, done.stderr
    assert '"deleted": 1' in done.stdout
    assert not old_path.exists() and Path(store.check(new)).exists()

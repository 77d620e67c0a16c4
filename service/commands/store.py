"""``hutch store sweep --older-than 7d``: delete blobs of the claim-check store by age.

Nothing deletes a blob when its task is acked (retries, dead letters and replays still point at
it), so blobs are removed by age: this command on one host, say daily, for a ``file://`` store,
or an S3 lifecycle rule for ``s3://`` (docs/operations.md, "The blob store"), which needs no
process at all. The store is the one ``HUTCH_STORE_URL`` names, as for workers and clients.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from service.commands import command
from service.errors import ConfigError, UsageError
from service.settings import flag_type, parse_duration
from service.store.config import StoreSettings
from service.store.errors import StoreError


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "store",
        help="look after the blob store of large arguments and results (HUTCH_STORE_URL)",
        description="The claim-check blob store named by HUTCH_STORE_URL.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    sweep = actions.add_parser(
        "sweep",
        help="delete blobs and unfinished uploads older than a duration",
        description="Delete every blob (sha256/...) and unfinished upload (incoming/...) last "
        "written longer ago than --older-than. Choose it longer than your longest retry "
        "horizon plus how long dead letters are kept for replay: a replayed message whose blob "
        "was swept is dead-lettered bad_ref. Nothing else under the root or prefix is touched.",
    )
    sweep.add_argument(
        "--older-than",
        required=True,
        type=flag_type(parse_duration),
        metavar="DURATION",
        help="age of what is deleted: 7d, 36h, 2w, 1h30m",
    )
    sweep.add_argument(
        "--dry-run", action="store_true", help="count what would be deleted; delete nothing"
    )
    sweep.add_argument("--json", action="store_true", help="print the report as one JSON object")
    sweep.set_defaults(run=_sweep)


@command
def _sweep(options: argparse.Namespace) -> int:
    try:
        settings = StoreSettings.from_env()
        if settings.url is None:
            raise UsageError("no blob store configured: set HUTCH_STORE_URL to the store to sweep")
        store = settings.open()
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    with store:
        try:
            report = store.sweep(options.older_than, dry_run=options.dry_run)
        except StoreError as exc:
            print(f"hutch: error: sweeping {store.url} failed: {exc}", file=sys.stderr)
            return 1
    if options.json:
        print(
            json.dumps(
                {
                    "store": store.url,
                    "older_than_seconds": options.older_than.total_seconds(),
                    "scanned": report.scanned,
                    "deleted": report.deleted,
                    "deleted_bytes": report.deleted_bytes,
                    "kept": report.kept,
                    "failed": report.failed,
                    "dry_run": report.dry_run,
                }
            )
        )
    verb = "would delete" if report.dry_run else "deleted"
    print(
        f"{store.url}: {verb} {report.deleted} of {report.scanned} ({report.deleted_bytes} "
        f"bytes), kept {report.kept}, failed {report.failed}",
        file=sys.stderr,
    )
    return 1 if report.failed else 0

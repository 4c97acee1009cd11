"""Every error backup/ raises, as BerthError (message + hint), so the controller, the
Celery jobs and the CLI print them as they are."""
from __future__ import annotations

from messaging.errors import BerthError


class BackupError(BerthError):
    """Base of the backup errors."""

    code = "backup"
    status = 500


class NotBtrfs(BackupError):
    """A btrfs operation on a path that is not on btrfs (or not a subvolume)."""

    code = "not_btrfs"
    default_hint = "put the volume root on a btrfs filesystem, or let backup.volumes " \
                   "choose the rsync --link-dest fallback"


class SnapshotExists(BackupError):
    """A snapshot of that volume at that second already exists."""

    code = "snapshot_exists"
    status = 409
    default_hint = "snapshots are named to the second; wait a second or delete the old one"


class BadSnapshotName(BackupError):
    """A name that is not `<volume>@<YYYYMMDDTHHMMSSZ>`."""

    code = "bad_snapshot_name"
    status = 400


class InvalidPolicy(BackupError):
    """A retention policy that does not parse."""

    code = "invalid_policy"
    status = 400
    default_hint = "write it as counts of periods, e.g. '24h 7d 4w 12m min=3' " \
                   "(h hourly, d daily, w weekly, m monthly, y yearly)"


class HookFailed(BackupError):
    """A pre-snapshot hook (CHECKPOINT, BGREWRITEAOF, pg_dump) failed: no snapshot taken."""

    code = "hook_failed"


class TransferFailed(BackupError):
    """A send | receive pipeline failed; the partial copy was removed."""

    code = "transfer_failed"


class ManifestMismatch(BackupError):
    """A copy whose files do not match its manifest: it is not complete."""

    code = "manifest_mismatch"
    default_hint = "pull the copy again; a copy is complete only after its checksums verify"


class ManifestMissing(BackupError):
    """A copy without a manifest (an interrupted copy)."""

    code = "manifest_missing"
    default_hint = "the copy was interrupted before its manifest was written; pull it again"

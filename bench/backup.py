"""Backups: snapshot time by volume size, and offsite pull throughput against plain
rsync of the same data. Run by hand, as root (it loop-mounts two btrfs filesystems):

    .venv/bin/python bench/backup.py [--sizes 10,100,1000] [--rounds 5] [--max-seconds 600]

Two filesystems are made in /var/tmp (files, `mkfs.btrfs`, `losetup -f --show`,
mounted): the served host's and the offsite host's. For each size (MB of random data
in 10 MB files, `sync`ed first) it times:
- `Snapshots.take` (a read-only btrfs snapshot), `--rounds` times: median and max;
- the served side's manifest (sha256 of every file), which a pull verifies against;
- a full offsite pull through the forced command (`offsite.pull_btrfs`: btrfs send |
  receive, manifest fetched, every checksum verified), beside its transfer alone
  (`btrfs.send_receive`, no verification) and beside plain `rsync -a` of the same
  snapshot to the offsite filesystem;
- after changing 1 MB: the incremental pull, beside plain `rsync -a` updating its
  earlier copy (rsync's own delta check);
- the rsync flavour (`offsite.pull` from a read-only rsync daemon module, link-dest
  against the previous copy, verified) beside plain `rsync -a` from the same module.
Every mount is unmounted, every loop device detached (the exact ones made), every file
removed, also on failure or Ctrl-C; the rsync daemon is stopped by its PID.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backup import btrfs, manifest, offsite  # noqa: E402
from backup.snapshots import Snapshots  # noqa: E402
from backup.volumes import VolumeStore  # noqa: E402
from dbprovision.command import run  # noqa: E402

MB = 1_000_000
T0 = datetime(2026, 12, 1, 0, 0, tzinfo=UTC)


@contextmanager
def loop_btrfs(size: str) -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="berth-bench-btrfs-", dir="/var/tmp"))
    work.chmod(0o711)
    image, mnt, device = work / "fs.img", work / "mnt", ""
    try:
        run(["truncate", "-s", size, image], timeout=10)
        run(["mkfs.btrfs", "-q", image], timeout=60)
        device = run(["losetup", "-f", "--show", image], timeout=10).stdout.strip()
        mnt.mkdir()
        run(["mount", device, mnt], timeout=30)
        yield mnt
    finally:
        if mnt.exists() and os.path.ismount(mnt):
            run(["umount", mnt], timeout=120, check=False)
        if device:
            run(["losetup", "-d", device], timeout=10, check=False)
        shutil.rmtree(work, ignore_errors=True)



def timed(fn: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def fill(path: Path, megabytes: int) -> None:
    for i in range(max(1, megabytes // 10)):
        with open(path / f"part{i:04d}.bin", "wb") as f:
            for _ in range(min(10, megabytes)):
                f.write(os.urandom(MB))
    run(["sync"], timeout=300)


def rate(megabytes: float, seconds: float) -> str:
    return f"{megabytes / seconds:7.0f} MB/s" if seconds > 0 else "      - MB/s"


def bench_size(mb: int, served: Path, away: Path, rounds: int) -> list[str]:
    lines: list[str] = []
    store = VolumeStore(served / f"s{mb}")
    snaps = Snapshots(store)
    vol = store.create(f"v{mb}")
    fill(vol.path, mb)
    size_mb = sum(p.stat().st_size for p in vol.path.iterdir()) / MB
    times = []
    for i in range(rounds):
        seconds, snap = timed(lambda i=i: snaps.take(vol, now=T0 + timedelta(seconds=i)))
        times.append(seconds)
        if i < rounds - 1:
            snaps.delete(snap)      # type: ignore[arg-type]
    first = snaps.list(vol.name)[-1]
    lines.append(f"{mb:>5} MB  snapshot        median {statistics.median(times) * 1000:6.1f} ms"
                 f"  max {max(times) * 1000:6.1f} ms  ({rounds} rounds, volume "
                 f"{size_mb:.0f} MB)")
    m_seconds, _ = timed(lambda: manifest.write(first.path))
    lines.append(f"{mb:>5} MB  manifest        {m_seconds:6.2f} s  {rate(size_mb, m_seconds)}"
                 "  (sha256 of every file, served side)")

    def remote(request: list[str]) -> list[str]:
        return ["env", f"SSH_ORIGINAL_COMMAND={shlex.join(request)}", sys.executable,
                "-m", "backup.forced", str(store.snapshots_dir)]

    copies = away / f"copies{mb}"
    bare = away / f"bare{mb}"
    plain = away / f"plain{mb}"
    for d in (copies, bare):
        d.mkdir(mode=0o700)
    # transfer alone, then the pull (transfer + manifest + verify), then plain rsync
    send_s, transfer = timed(lambda: btrfs.send_receive(first.path, bare))
    btrfs.delete_subvolume(bare / first.name)
    run(["sync"], timeout=300)
    pull_s, pulled = timed(lambda: offsite.pull_btrfs(remote, copies))
    run(["sync"], timeout=300)
    rsync_s, _ = timed(lambda: run(["rsync", "-a", f"{first.path}/", f"{plain}/"],
                                   timeout=3600))
    moved = transfer.bytes / MB        # type: ignore[attr-defined]
    lines.append(f"{mb:>5} MB  full pull       {pull_s:6.2f} s  {rate(size_mb, pull_s)}"
                 f"  (send|receive alone {send_s:.2f} s {rate(moved, send_s)}); "
                 f"plain rsync -a {rsync_s:.2f} s {rate(size_mb, rsync_s)}: pull/rsync "
                 f"{pull_s / rsync_s:.2f}x, transfer/rsync {send_s / rsync_s:.2f}x")

    with open(vol.path / "part0000.bin", "r+b") as f:
        f.seek(MB // 2)
        f.write(os.urandom(MB))
    second = snaps.take(vol, now=T0 + timedelta(minutes=5))
    manifest.write(second.path)
    run(["sync"], timeout=300)
    inc_s, inc = timed(lambda: offsite.pull_btrfs(remote, copies))
    inc_bytes = inc[0].bytes_received if inc else 0        # type: ignore[index]
    rsync2_s, _ = timed(lambda: run(["rsync", "-a", f"{second.path}/", f"{plain}/"],
                                    timeout=3600))
    lines.append(f"{mb:>5} MB  1 MB changed    incremental pull {inc_s:6.2f} s "
                 f"({inc_bytes / MB:.2f} MB sent, verified); plain rsync -a update "
                 f"{rsync2_s:.2f} s: ratio {inc_s / rsync2_s:.2f}x")

    # the rsync flavour from a read-only daemon module, against plain rsync from it
    rcopies, rplain = away / f"rcopies{mb}", away / f"rplain{mb}"
    rcopies.mkdir(mode=0o700)
    with offsite.read_only_module(store.snapshots_dir, away.parent) as source:
        r_s, _ = timed(lambda: offsite.pull(source, first.name, rcopies))
        rp_s, _ = timed(lambda: run(["rsync", "-a", f"{source}/{first.name}/", f"{rplain}/"],
                                    timeout=3600))
        r2_s, r2 = timed(lambda: offsite.pull(source, second.name, rcopies))
    lines.append(f"{mb:>5} MB  rsync module    full pull {r_s:6.2f} s {rate(size_mb, r_s)} "
                 f"(verified); plain rsync -a {rp_s:.2f} s {rate(size_mb, rp_s)}: "
                 f"{r_s / rp_s:.2f}x; second pull {r2_s:.2f} s, "
                 f"{r2.bytes_received / MB:.2f} MB")           # type: ignore[attr-defined]
    for tree in (plain, rplain):
        shutil.rmtree(tree, ignore_errors=True)
    for d in (copies, rcopies):
        for entry in sorted(d.iterdir()):
            if btrfs.is_subvolume(entry):
                btrfs.delete_subvolume(entry)
    for s in snaps.list():
        snaps.delete(s)
    btrfs.delete_subvolume(vol.path)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,100,1000", help="volume sizes in MB")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=600)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/backup.py loop-mounts btrfs: run it as root")
    sizes = [int(s) for s in args.sizes.split(",")]
    biggest = max(sizes)
    deadline = time.monotonic() + args.max_seconds
    print(f"# bench/backup.py  {datetime.now(UTC):%Y-%m-%d %H:%M}Z  "
          f"load {os.getloadavg()[0]:.2f}  cores {os.cpu_count()}")
    with loop_btrfs(f"{biggest * 2 + 600}M") as served, \
            loop_btrfs(f"{biggest * 4 + 800}M") as away:
        for mb in sizes:
            if time.monotonic() > deadline:
                print(f"{mb:>5} MB  skipped: --max-seconds reached")
                continue
            for line in bench_size(mb, served, away, args.rounds):
                print(line, flush=True)
    print(f"# loop devices left: {run(['losetup', '-a'], timeout=10).stdout.count('berth-bench')}")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Install what Berth needs on a fresh Debian machine with Python 3, then make .venv.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# bubblewrap, nftables (and util-linux's setpriv, passwd's useradd, both in every
# Debian) wall one app off from another when the runner runs as root
APT_PACKAGES=(curl ca-certificates git bubblewrap nftables)
# addons (dbprovision/): PostgreSQL 15 server and client programs (initdb, pg_ctl,
# pg_dump, psql in /usr/lib/postgresql/15/bin), redis-server and redis-cli, PgBouncer
APT_PACKAGES+=(postgresql-15 postgresql-client-15 redis-server redis-tools pgbouncer)
# backups (backup/): btrfs-progs (subvolumes, read-only snapshots, send/receive) and
# rsync (the --link-dest fallback on other filesystems; rrsync for the offsite pull)
APT_PACKAGES+=(btrfs-progs rsync)
# the balancer's per-request core compiled with mypyc (balancer/native.py) needs a C
# compiler and the Python headers
APT_PACKAGES+=(gcc python3-dev)
# Debian's own interpreter is built with optimizations (about 25% faster than a plain
# source build on the balancer's hot paths); use it when present.
if [ -z "${PYTHON:-}" ]; then
  if [ -x /usr/bin/python3 ]; then PYTHON=/usr/bin/python3; else PYTHON=python3; fi
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "-----> Installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# As root the runner runs each app's unpacking and virtualenv steps as that app's
# user, from this checkout: every directory above it must let others pass (o+x, not
# read). Said out loud when changed; a checkout under /tmp.XXXX or /root needs it.
if [ "$(id -u)" -eq 0 ]; then
  d=$(pwd -P)
  while [ "$d" != "/" ]; do
    if [ -z "$(find "$d" -maxdepth 0 -perm -o=x)" ]; then
      echo "-----> Letting app users pass through $d (chmod o+x) to run Berth's unpacker"
      chmod o+x "$d"
    fi
    d=$(dirname "$d")
  done
fi

# The offsite backup host, simulated on this machine (issue 10): its own user, its own
# directory (0700, only that user's) and its own address, 127.0.0.9. It pulls with
# `berth backup pull` and holds no credential of the served hosts' platform; they
# hold none for it (root on one machine could of course reach it; real hosts are apart).
if [ "$(id -u)" -eq 0 ]; then
  if ! id berth-offsite >/dev/null 2>&1; then
    echo "-----> Adding the simulated offsite host's user berth-offsite (/var/lib/berth-offsite)"
    useradd --system --home-dir /var/lib/berth-offsite --create-home \
      --shell /usr/sbin/nologin berth-offsite
  fi
  mkdir -p /var/lib/berth-offsite/copies
  chown -R berth-offsite: /var/lib/berth-offsite
  chmod 0700 /var/lib/berth-offsite /var/lib/berth-offsite/copies
fi

if [ ! -x .venv/bin/python ]; then
  echo "-----> Creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.berth-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "-----> Installing Berth and its dependencies into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
  touch "$stamp"
fi

# the balancer's per-request core compiled with mypyc for these sources (about twice
# as fast per request); without it the balancer runs its pure Python modules
if ! .venv/bin/python -c 'import sys, balancer.native as n; sys.exit(not n.built())'; then
  echo "-----> Compiling the balancer's per-request core (mypyc, about 35 s)"
  .venv/bin/python -m balancer.native build >/dev/null \
    || echo "       not compiled: the balancer runs its pure Python modules"
fi

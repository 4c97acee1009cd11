"""Apps cannot reach loopback services: the kernel refuses them by socket owner uid.

One nftables table, `inet berth`, is shared by every runner on the machine. Its
`output` chain refuses connections that a socket owned by an app uid (the declared
range, see runner/users.py) opens to 127.0.0.0/8 or ::1:

    TCP: the opening SYN to a port not in @allowed_tcp gets a TCP reset, so connect()
         fails with ECONNREFUSED, as if nothing listened there;
    UDP: any datagram except to port 53 (DNS) gets ICMP port unreachable.

Only opening SYNs (SYN without ACK) are matched, never later packets: app instances
listen on loopback themselves and their answers to the balancer are sent by sockets
they own. Matching flags instead of `ct state new` keeps the rules working where
loopback traffic is not tracked. TCP to port 53 passes too: DNS falls back to TCP
for long answers. Connections to any other address are not touched.

Every change is one `nft -f -` script, applied by the kernel as one transaction:
`add` makes what is missing and leaves the rest, and `flush chain` + `add rule` swap
the rules at once, so runners doing it concurrently leave exactly one copy, and no
packet ever sees the chain empty.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

from runner.errors import IsolationError

CHAIN = "output"
SET = "allowed_tcp"
DNS = 53
TABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
TIMEOUT = 30.0
LOOPBACK = ("ip daddr 127.0.0.0/8", "ip6 daddr ::1")


class Firewall:
    def __init__(self, uid_min: int, uid_max: int, table: str = "berth") -> None:
        if not 1 <= uid_min <= uid_max < 2**32 - 1:
            raise IsolationError(f"app uid range {uid_min}-{uid_max} is not valid",
                                 "set app_uid_min <= app_uid_max, both above 0")
        if not TABLE_NAME.match(table):
            raise IsolationError(f"nftables table name {table!r} is not valid",
                                 "use letters, digits and _, starting with a letter")
        self.uid_min = uid_min
        self.uid_max = uid_max
        self.table = table

    # ---- setup -----------------------------------------------------------------
    def available(self) -> tuple[bool, str]:
        """Whether nft is present and usable here, and why not."""
        if shutil.which("nft") is None:
            return False, "nft is not installed (apt-get install nftables)"
        if os.geteuid() != 0:
            return False, "changing nftables rules needs root"
        try:
            self._nft(["list", "tables"])
        except IsolationError as exc:
            return False, exc.message
        return True, ""

    def script(self) -> str:
        """The whole setup as one nft script (what ensure() applies)."""
        owner = f"meta skuid {self.uid_min}-{self.uid_max}" if self.uid_min < self.uid_max \
            else f"meta skuid {self.uid_min}"
        where = f"inet {self.table}"
        lines = [
            f"add table {where}",
            f"add chain {where} {CHAIN} "
            "{ type filter hook output priority 0; policy accept; }",
            f"add set {where} {SET} {{ type inet_service; }}",
            f"flush chain {where} {CHAIN}",
        ]
        for daddr in LOOPBACK:
            lines.append(f"add rule {where} {CHAIN} {owner} {daddr} tcp flags syn / syn,ack "
                         f"tcp dport != {DNS} tcp dport != @{SET} reject with tcp reset")
        for daddr in LOOPBACK:
            lines.append(f"add rule {where} {CHAIN} {owner} {daddr} udp dport != {DNS} "
                         "reject")
        return "\n".join(lines) + "\n"

    def ensure(self) -> None:
        """Install or refresh the table, chain, set and rules; the set keeps its ports."""
        self._apply(self.script(), "install the firewall rules")

    # ---- ports apps may reach ----------------------------------------------------
    def allow(self, port: int) -> None:
        """Let apps connect to `port` on loopback (an addon's server, later)."""
        where = f"inet {self.table}"
        self._apply(f"add table {where}\n"
                    f"add set {where} {SET} {{ type inet_service; }}\n"
                    f"add element {where} {SET} {{ {_port(port)} }}\n",
                    f"allow port {port}")

    def disallow(self, port: int) -> None:
        """Stop letting apps reach `port`; a port that was not allowed is fine.
        (add + delete in one transaction: nft 1.0.6 has no `destroy`.)"""
        where = f"inet {self.table}"
        self._apply(f"add table {where}\n"
                    f"add set {where} {SET} {{ type inet_service; }}\n"
                    f"add element {where} {SET} {{ {_port(port)} }}\n"
                    f"delete element {where} {SET} {{ {_port(port)} }}\n",
                    f"disallow port {port}")

    def allowed(self) -> set[int]:
        """Ports in @allowed_tcp; empty when the table is not there yet."""
        try:
            out = self._nft(["-j", "list", "set", "inet", self.table, SET])
        except IsolationError as exc:
            if "No such file or directory" in exc.message:
                return set()
            raise
        ports: set[int] = set()
        for item in json.loads(out).get("nftables", []):
            for elem in item.get("set", {}).get("elem", []):
                if isinstance(elem, int):
                    ports.add(elem)
                elif isinstance(elem, dict) and "range" in elem:   # added by hand
                    low, high = elem["range"]
                    ports.update(range(int(low), int(high) + 1))
        return ports

    def rules(self) -> str:
        """`nft list table inet <table>`, for `berth hosts` and debugging."""
        return self._nft(["list", "table", "inet", self.table])

    # ---- nft ---------------------------------------------------------------------
    def _apply(self, script: str, what: str) -> None:
        try:
            self._nft(["-f", "-"], stdin=script)
        except IsolationError as exc:
            raise IsolationError(f"cannot {what}: {exc.message}", exc.hint) from exc

    @staticmethod
    def _nft(args: list[str], stdin: str | None = None) -> str:
        argv = ["nft", *args]
        try:
            result = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                                    check=True, timeout=TIMEOUT)
        except subprocess.CalledProcessError as exc:
            raise IsolationError(f"{' '.join(argv)} failed: {exc.stderr.strip()}",
                                 "run the runner as root on a kernel with nf_tables "
                                 "(check: nft list ruleset)") from exc
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise IsolationError(f"cannot run nft: {exc}",
                                 "install nftables (apt-get install nftables)") from exc
        return result.stdout


def _port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise IsolationError(f"port {port!r} is not a TCP port", "use 1-65535")
    return port

"""A private network of Linux network namespaces, so that "separate machines" can be tried on one host.

    net = Network("fm1234")            # a switch namespace holding a bridge
    ip = net.add_host("link")          # namespace fm1234-link, address 10.77.0.1/24, linked to the bridge
    cmd = net.wrap("link", ["flower-superlink", ...])   # ["ip", "netns", "exec", "fm1234-link", ...]
    net.close()                        # deletes every namespace (their veth pairs go with them)

Every host namespace gets its own loopback and one veth interface whose peer sits on a bridge in the switch
namespace, so traffic between hosts crosses real interfaces and a bridge, never the host's loopback. Nothing is
created in the root namespace: the veth pairs are created directly inside their namespaces. Needs root (or
CAP_NET_ADMIN) and `ip` from iproute2; `available()` says whether this machine can do it and why not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from typing import Self


def _ip(*args: str, timeout: float = 20) -> None:
    out = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {out.stderr.strip()}")


def available() -> tuple[bool, str]:
    """(True, "") if network namespaces can be created here, else (False, the reason)."""
    if shutil.which("ip") is None:
        return False, "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return False, "network namespaces need root (CAP_NET_ADMIN); this user is not root"
    probe = f"fmprobe{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
        _ip("-n", probe, "link", "add", "br0", "type", "bridge")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
        return False, f"cannot create a network namespace with a bridge: {err}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], check=False, capture_output=True, timeout=20)
    return True, ""


class Network:
    """Namespaces `<tag>-sw` (bridge) and `<tag>-<host>` (one per host) on subnet `<prefix>.0/24`."""

    def __init__(self, tag: str | None = None, prefix: str = "10.77.0") -> None:
        self.tag = tag or f"fm{uuid.uuid4().hex[:6]}"
        if len(self.tag) > 8:
            raise ValueError(f"network tag {self.tag!r} is too long (interface names are limited to 15 chars)")
        self.prefix = prefix
        self.hosts: dict[str, str] = {}  # host name -> IPv4 address
        self.namespaces: list[str] = []
        self.switch = self._add_ns("sw")
        try:
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def _add_ns(self, name: str) -> str:
        ns = f"{self.tag}-{name}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        return ns

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def add_host(self, host: str) -> str:
        """Create namespace `<tag>-<host>` with loopback and one interface on the bridge; return its address."""
        if host in self.hosts or host == "sw":
            raise ValueError(f"host {host!r} already exists")
        index = len(self.hosts) + 1
        if index > 250:
            raise ValueError("at most 250 hosts on one network")
        ns = self._add_ns(host)
        inside, peer = f"{self.tag}h{index}", f"{self.tag}p{index}"
        address = f"{self.prefix}.{index}"
        _ip("link", "add", inside, "netns", ns, "type", "veth", "peer", "name", peer, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", peer, "master", "br0")
        _ip("-n", self.switch, "link", "set", peer, "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", inside)
        _ip("-n", ns, "link", "set", inside, "up")
        _ip("-n", ns, "link", "set", "lo", "up")  # the SuperLink/SuperNode runtime APIs live on loopback
        self.hosts[host] = address
        return address

    def wrap(self, host: str, cmd: list[str]) -> list[str]:
        """The command line that runs `cmd` inside the host's namespace (`ip netns exec` execs, same PID)."""
        if host not in self.hosts:
            raise KeyError(f"no host {host!r} on network {self.tag}")
        return ["ip", "netns", "exec", self.ns(host), *cmd]

    def traffic(self, host: str) -> dict:
        """{"rx_bytes", "tx_bytes"} summed over the host's interfaces other than loopback (its veth)."""
        out = subprocess.run(["ip", "-j", "-s", "-n", self.ns(host), "link", "show"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
        links = [i for i in json.loads(out) if i["ifname"] != "lo"]
        return {"rx_bytes": sum(i["stats64"]["rx"]["bytes"] for i in links),
                "tx_bytes": sum(i["stats64"]["tx"]["bytes"] for i in links)}

    def close(self) -> None:
        """Delete every namespace this network created (idempotent)."""
        errors = []
        for ns in reversed(self.namespaces):
            out = subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, text=True, timeout=30)
            if out.returncode != 0 and "No such file" not in out.stderr:
                errors.append(f"{ns}: {out.stderr.strip()}")
        self.namespaces.clear()
        self.hosts.clear()
        if errors:
            raise RuntimeError("could not delete network namespaces: " + "; ".join(errors))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

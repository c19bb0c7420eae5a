"""Test hosts on one machine: Linux network namespaces joined by veth pairs and a bridge, each
running its own sshd with a throwaway key, named `rlnode1`, `rlnode2`, ... for hostfiles.

    with netns_hosts(tmp_path, 2) as hosts:
        hosts.run(1, ["deepspeed", "--hostfile", hosts.hostfile(slots=1), ...])   # from host 1

Each namespace has `lo` and one interface `rl0` (10.213.X.i/24; X differs per test process, so
parallel sessions do not meet). The bridge has no address: traffic goes only between the
test's own namespaces, never to the machine or beyond. Inside a namespace `/etc/hosts` is the
test's (`ip netns exec` binds /etc/netns/<ns>/hosts over it): the host names, and this machine's
own name on a loopback address, as Debian writes it, which is the trap a multi-node gloo run
falls into (rlengine/network.py). A process started over ssh to `rlnodeN` runs in namespace N.

Needs root, iproute2 and openssh-server (`tools/install.sh --tests`); `unavailable()` says why
not where they are missing, for a one-line skip.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def unavailable() -> str | None:
    """Why namespace hosts cannot be built here, or None."""
    if os.geteuid() != 0:
        return "network-namespace hosts need root"
    for tool in ("ip", "ssh", "ssh-keygen", "pdsh"):
        if shutil.which(tool) is None:
            return f"network-namespace hosts need `{tool}` (bash tools/install.sh --tests)"
    if not Path(SSHD).exists():
        return "network-namespace hosts need openssh-server (bash tools/install.sh --tests)"
    probe = f"rlprobe{os.getpid() % 100000}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@dataclass
class Hosts:
    names: list[str]                     # rlnode1, rlnode2, ...
    namespaces: list[str]
    addresses: list[str]
    ifname: str
    root: Path
    env: dict                            # PATH with the ssh wrapper first, HOME of the test
    daemons: list = field(default_factory=list)

    def hostfile(self, slots: int = 1) -> str:
        path = self.root / "hostfile"
        path.write_text("".join(f"{n} slots={slots}\n" for n in self.names))
        return str(path)

    def popen(self, host: int, cmd: list[str], **kw) -> subprocess.Popen:
        """Start `cmd` on host `host` (1-based) as a user logged in there would."""
        return subprocess.Popen(["ip", "netns", "exec", self.namespaces[host - 1], *cmd], **{"env": self.env, **kw})

    def run(self, host: int, cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.namespaces[host - 1], *cmd], capture_output=True,
                              text=True, timeout=timeout, **{"env": self.env, **kw})

    def link(self, host: int, up: bool) -> None:
        """Take host `host`'s interface down (a cable pulled: no reset reaches the peers) or up."""
        _ip("link", "set", self.ifname, "up" if up else "down", ns=self.namespaces[host - 1])


def write_ssh_setup(root: Path, servers: list[tuple[str, str, int]]) -> Path:
    """Throwaway host and user keys, `ssh/sshd_<i>` for each (client host pattern, listen address,
    port) of `servers`, and `bin/ssh`: the real client with the test's config, to put first on
    PATH (ssh reads ~/.ssh/config from the password database, not $HOME). Returns `root/ssh`."""
    keys = root / "ssh"
    keys.mkdir(parents=True)
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / key)], check=True)
    shutil.copy(keys / "user_key.pub", keys / "authorized_keys")
    client = ""
    for i, (pattern, addr, port) in enumerate(servers):
        (keys / f"sshd_{i}").write_text(
            f"Port {port}\nListenAddress {addr}\nHostKey {keys / 'host_key'}\n"
            f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPermitRootLogin yes\nStrictModes no\n"
            f"PasswordAuthentication no\nUsePAM no\nPidFile none\nSetEnv PATH={root / 'bin'}:{os.environ['PATH']}\n")
        client += (f"Host {pattern}\n  Port {port}\n  IdentityFile {keys / 'user_key'}\n  StrictHostKeyChecking no\n"
                   f"  UserKnownHostsFile {keys / 'known_hosts'}\n  BatchMode yes\n  ConnectTimeout 10\n")
    (keys / "ssh_config").write_text(client)
    bindir = root / "bin"
    bindir.mkdir()
    (bindir / "ssh").write_text(f"#!/bin/sh\nexec {shutil.which('ssh')} -F {keys / 'ssh_config'} \"$@\"\n")
    (bindir / "ssh").chmod(0o755)
    Path("/run/sshd").mkdir(exist_ok=True)          # sshd's privilege-separation directory
    return keys


@contextmanager
def netns_hosts(root: Path, n: int = 2):
    tag = f"{os.getpid() % 10000}"
    subnet = f"10.213.{os.getpid() % 250 + 1}"
    names = [f"rlnode{i}" for i in range(1, n + 1)]
    namespaces = [f"rlt{tag}h{i}" for i in range(1, n + 1)]
    addresses = [f"{subnet}.{i}" for i in range(1, n + 1)]
    bridge = f"rlt{tag}br"
    home = root / "home"
    home.mkdir(parents=True)
    hosts_file = "127.0.0.1 localhost\n" + f"127.0.1.1 {socket.gethostname()}\n" + \
        "".join(f"{a} {nm}\n" for a, nm in zip(addresses, names))
    keys = write_ssh_setup(root, [(name, addr, 22) for name, addr in zip(names, addresses)])
    env = dict(os.environ, PATH=f"{root / 'bin'}:{os.environ['PATH']}", HOME=str(home))
    hosts = Hosts(names, namespaces, addresses, "rl0", root, env)
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("link", "set", bridge, "up")
        for i, (ns, addr) in enumerate(zip(namespaces, addresses), start=1):
            Path(f"/etc/netns/{ns}").mkdir(parents=True, exist_ok=True)
            Path(f"/etc/netns/{ns}/hosts").write_text(hosts_file)
            _ip("netns", "add", ns)
            _ip("link", "set", "lo", "up", ns=ns)
            _ip("link", "add", f"rlt{tag}v{i}", "type", "veth", "peer", "name", "rl0", "netns", ns)
            _ip("link", "set", f"rlt{tag}v{i}", "master", bridge, "up")
            _ip("addr", "add", f"{addr}/24", "dev", "rl0", ns=ns)
            _ip("link", "set", "rl0", "up", ns=ns)
        for i, ns in enumerate(namespaces):
            hosts.daemons.append(subprocess.Popen(["ip", "netns", "exec", ns, SSHD, "-D", "-e", "-f",
                                                  str(keys / f"sshd_{i}")],
                                                 stderr=open(root / f"sshd_{i}.log", "w")))
        _wait_for_ssh(hosts)
        yield hosts
    finally:
        for d in hosts.daemons:
            d.kill()
            d.wait()
        for i, ns in enumerate(namespaces, start=1):
            # whatever a failed test left running there (launchers, ranks) dies with its host
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "link", "del", f"rlt{tag}v{i}"], capture_output=True)   # the pair, both ends
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def _wait_for_ssh(hosts: Hosts, timeout: float = 30) -> None:
    """Every host answers `ssh <name> true` from host 1."""
    deadline = time.monotonic() + timeout
    for name in hosts.names:
        while True:
            r = hosts.run(1, ["ssh", name, "true"], timeout=30)
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd on {name} does not answer: {r.stderr.strip()}")
            time.sleep(0.5)

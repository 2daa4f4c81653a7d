"""A real DVC SSH remote: OpenSSH's sshd on loopback (its own config, host key and authorized key in a
temporary folder), `dvc push` from one clone, `dvc pull` into another, where `dvc repro` runs nothing.

`make test` installs Debian's openssh-server where /usr/sbin/sshd is missing (scripts/setup.sh --test);
only without it is this test skipped."""
from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import env, sh, tree_digest

SSHD = Path("/usr/sbin/sshd")

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not SSHD.is_file(), reason=f"{SSHD} missing: install openssh-server "
                                                            "(`make test` does, as root with apt-get)")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Every live descendant of `pid` (sshd forks a process per connection)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    """Running, not merely a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def ssh_server(tmp_path):
    """sshd on 127.0.0.1:<free port>; yields (user, port, client key, HOME with known_hosts). Killed after,
    with every process it forked."""
    d = tmp_path / "sshd"
    d.mkdir()
    for name in ("host_key", "client_key"):
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(d / name), cwd=d)
    (d / "authorized_keys").write_bytes((d / "client_key.pub").read_bytes())
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
        "StrictModes no\nUsePAM no\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        "Subsystem sftp internal-sftp\n", encoding="utf-8")
    if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
        # sshd started as root needs its privilege separation folder; the system service (never
        # started here) would create it
        Path("/run/sshd").mkdir(mode=0o755)
    log = (d / "sshd.log").open("wb")
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20
        while True:
            assert proc.poll() is None, f"sshd exited {proc.returncode}: {(d / 'sshd.log').read_text()}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline, f"sshd not listening: {(d / 'sshd.log').read_text()}"
                time.sleep(0.1)
        home = tmp_path / "home"
        (home / ".ssh").mkdir(parents=True)
        host_key = (d / "host_key.pub").read_text().split()
        (home / ".ssh/known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
        yield pwd.getpwuid(os.getuid()).pw_name, port, d / "client_key", home
    finally:
        survivors = _children(proc.pid)
        for pid in survivors:
            os.kill(pid, signal.SIGTERM)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        deadline = time.time() + 10
        while any(map(_alive, survivors)) and time.time() < deadline:
            time.sleep(0.1)
        for pid in filter(_alive, survivors):
            os.kill(pid, signal.SIGKILL)
        assert not any(map(_alive, survivors)), f"sshd processes left: {survivors}"


def _dvc(*args: str, cwd: Path, home: Path) -> subprocess.CompletedProcess:
    """dvc with HOME pointing at the known_hosts that trusts the test's sshd (no prompt, no user files)."""
    proc = subprocess.run(["dvc", *args], cwd=cwd, env={**env(), "HOME": str(home)}, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, f"dvc {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _outs(project: Path) -> dict:
    """Path -> bytes of every DVC-tracked output listed in dvc.lock."""
    import yaml

    lock = yaml.safe_load((project / "dvc.lock").read_text(encoding="utf-8"))
    out = {}
    for stage in lock["stages"].values():
        for o in stage.get("outs", []):
            path = project / o["path"]
            out.update({f"{o['path']}/{k}": v for k, v in tree_digest(path).items()} if path.is_dir()
                       else {o["path"]: path.read_bytes()})
    return out


def test_results_travel_through_an_ssh_remote_and_nothing_reruns(project, tmp_path, ssh_server):
    user, port, key, home = ssh_server
    store = tmp_path / "store"
    store.mkdir()
    _dvc("remote", "add", "-d", "store", f"ssh://{user}@127.0.0.1:{port}{store}", cwd=project, home=home)
    _dvc("remote", "modify", "--local", "store", "keyfile", str(key), cwd=project, home=home)
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-q", "-m", "SSH remote", cwd=project)
    assert "keyfile" not in sh("git", "show", "HEAD:.dvc/config", cwd=project).stdout  # local config stays local
    _dvc("push", cwd=project, home=home)
    assert any((store / "files" / "md5").rglob("*")), "nothing arrived in the remote"

    other = tmp_path / "other"
    sh("git", "clone", "-q", str(project), str(other), cwd=tmp_path)
    assert not (other / "models/merged").exists()
    _dvc("remote", "modify", "--local", "store", "keyfile", str(key), cwd=other, home=home)
    _dvc("pull", cwd=other, home=home)
    assert _outs(other) == _outs(project)
    out = _dvc("repro", cwd=other, home=home).stdout
    assert "Running stage" not in out and "Data and pipelines are up to date" in out, out
    status = _dvc("status", cwd=other, home=home).stdout
    assert "Data and pipelines are up to date" in status, status
    assert sh("git", "status", "--porcelain", cwd=other).stdout == ""

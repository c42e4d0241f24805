"""``lazysnap serve`` and ``lazysnap status`` as an operator meets them: a real subprocess."""

from __future__ import annotations

import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from snapshotter._proto import snapshots_pb2
from tests.support.daemon import LAZYSNAP, Daemon, running_daemon

pytestmark = pytest.mark.root


def _serve(tmp: Path, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LAZYSNAP, "serve", *args], capture_output=True, text=True, timeout=timeout,
        cwd=tmp,
    )


def _status(address: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LAZYSNAP, "status", "--address", str(address), "--timeout", "2", "--json"],
        capture_output=True, text=True, timeout=30,
    )


def test_socket_and_directory_modes_and_status(short_tmp: Path) -> None:
    with running_daemon(short_tmp / "d") as daemon:
        assert stat.S_IMODE(daemon.address.stat().st_mode) == 0o660
        assert stat.S_ISSOCK(daemon.address.stat().st_mode)
        assert stat.S_IMODE(daemon.address.parent.stat().st_mode) == 0o700
        result = _status(daemon.address)
        assert result.returncode == 0, result.stderr
        assert '"healthy": true' in result.stdout and str(daemon.root) in result.stdout
        assert '"kata_guest_pull": {"enabled": false, "mount_type": ""}' in result.stdout
    assert not daemon.address.exists(), "a clean shutdown removes the socket"
    down = _status(daemon.address)
    assert down.returncode == 1 and "not healthy" in down.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_shutdown_is_clean_and_keeps_data(short_tmp: Path, signum: int) -> None:
    daemon = Daemon(short_tmp / "root", short_tmp / "s.sock", short_tmp / "log")
    daemon.start()
    try:
        with daemon.snapshots() as stub:
            stub.Prepare(snapshots_pb2.PrepareSnapshotRequest(key="a", labels={"k": "v"}))
            stub.Commit(snapshots_pb2.CommitSnapshotRequest(name="base", key="a",
                                                            labels={"x": "y"}))
            stub.Prepare(snapshots_pb2.PrepareSnapshotRequest(key="top", parent="base"))
        assert daemon.process is not None
        daemon.process.send_signal(signum)
        assert daemon.process.wait(timeout=20) == 0
        daemon.process = None
        assert '"msg": "stopped"' in daemon.log()
        daemon.start()
        with daemon.snapshots() as stub:
            base = stub.Stat(snapshots_pb2.StatSnapshotRequest(key="base")).info
            top = stub.Stat(snapshots_pb2.StatSnapshotRequest(key="top")).info
        assert base.kind == snapshots_pb2.COMMITTED and dict(base.labels) == {"x": "y"}
        assert top.kind == snapshots_pb2.ACTIVE and top.parent == "base"
    finally:
        daemon.stop()


def test_stale_socket_is_replaced(short_tmp: Path) -> None:
    address = short_tmp / "s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(address))
    stale.close()  # bound but nobody listens: what a killed daemon leaves behind
    daemon = Daemon(short_tmp / "root", address, short_tmp / "log")
    daemon.start()
    try:
        assert daemon.healthy()
    finally:
        daemon.stop()


def test_socket_in_use_is_a_clear_startup_error(short_tmp: Path) -> None:
    with running_daemon(short_tmp / "d") as daemon:
        second = _serve(short_tmp, "--root", str(short_tmp / "other"), "--address",
                        str(daemon.address))
        assert second.returncode == 1
        assert "is in use: another daemon is serving on it" in second.stderr
        assert "Traceback" not in second.stderr
        assert daemon.healthy(), "the first daemon keeps serving"


def test_non_socket_path_is_not_replaced(short_tmp: Path) -> None:
    address = short_tmp / "important.txt"
    address.write_text("keep me")
    result = _serve(short_tmp, "--root", str(short_tmp / "root"), "--address", str(address))
    assert result.returncode == 1 and "is not a socket" in result.stderr
    assert address.read_text() == "keep me"


def test_unusable_root_is_a_clear_startup_error(short_tmp: Path) -> None:
    blocker = short_tmp / "file"
    blocker.write_text("")
    result = _serve(short_tmp, "--root", str(blocker / "root"), "--address",
                    str(short_tmp / "s.sock"))
    assert result.returncode == 1
    assert f"cannot use state root {blocker / 'root'}" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_file_is_a_clear_error(short_tmp: Path) -> None:
    config = short_tmp / "config.toml"
    config.write_text('root = "relative"\n')
    result = _serve(short_tmp, "--config", str(config))
    assert result.returncode == 2
    assert "configuration error" in result.stderr and "absolute path" in result.stderr


def test_flags_override_the_config_file(short_tmp: Path) -> None:
    config = short_tmp / "config.toml"
    config.write_text(f'root = "{short_tmp}/from-file"\naddress = "{short_tmp}/file.sock"\n')
    daemon = Daemon(short_tmp / "from-flag", short_tmp / "flag.sock", short_tmp / "log",
                    extra_args=["--config", str(config)])
    daemon.start()  # Daemon passes --root/--address, which must win over the file
    try:
        assert (short_tmp / "from-flag" / "metadata.db").exists()
        assert not (short_tmp / "from-file").exists()
        assert not (short_tmp / "file.sock").exists()
    finally:
        daemon.stop()


def test_sd_notify_ready_and_stopping(short_tmp: Path) -> None:
    notify_path = short_tmp / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(notify_path))
        listener.settimeout(20)
        daemon = Daemon(short_tmp / "root", short_tmp / "s.sock", short_tmp / "log",
                        env={"NOTIFY_SOCKET": str(notify_path)})
        daemon.start()
        try:
            ready = listener.recv(4096).decode()
            assert ready.startswith("READY=1") and "MAINPID=" in ready
        finally:
            assert daemon.stop() == 0
        assert listener.recv(4096) == b"STOPPING=1"

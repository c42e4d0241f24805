"""What ``lazysnap pull --snapshotter-address`` imports to unpack what the daemon resolved."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

# The modules ``commands.pull._unpack_resolved`` imports, as it imports them.
UNPACK_RESOLVED = (
    "import snapshotter.commands.pull;"
    "from registry import NotFoundError, RegistryError;"
    "from snapshotter.client.containerd_client import ContainerdClient;"
    "from snapshotter.client.direct_apply import DirectApplier;"
    "from snapshotter.client.documents import documents_from_answer;"
    "from snapshotter.client.pull import store_and_unpack;"
    "from snapshotter.client.registry_blobs import OnDemandRegistryBlobs;"
    "from snapshotter.client.soci_check import has_v2_index;"
)


def _loaded(code: str, names: tuple[str, ...]) -> list[str]:
    probe = f"import sys; {code} print(' '.join(m for m in {names!r} if m in sys.modules))"
    return subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()


def test_unpacking_what_the_daemon_resolved_imports_no_registry_client() -> None:
    # httpx and anyio cost about as much start-up as the rest of the pull: they are imported
    # only when a layer must be fetched here.
    assert _loaded(UNPACK_RESOLVED, ("httpx", "anyio", "trio", "registry.client")) == []


def test_the_registry_client_is_still_there_when_asked_for() -> None:
    code = "import registry; registry.RegistryClient; registry.DockerConfigCredentials;"
    assert _loaded(code, ("httpx", "registry.client", "registry.credentials")) == [
        "httpx", "registry.client", "registry.credentials"]


def test_the_pull_command_reaches_the_resolve_without_the_blob_fetch_modules() -> None:
    # Everything imported before the Resolve RPC is sent delays the daemon's work; the
    # on-demand blob fetch (tempfile, random) is needed only after the answer.
    assert _loaded("import snapshotter.commands.pull;",
                   ("snapshotter.client.registry_blobs", "tempfile")) == []



# Runs `lazysnap pull --snapshotter-address` up to the moment the Resolve leaves (send_resolve
# replaced by a probe), and prints what of HEAVY was loaded by then.
HEAVY = ("google.protobuf", "snapshotter._proto.daemon_pb2", "snapshotter.client.daemon_client",
         "snapshotter.daemon.config", "registry", "trio", "httpx")
UP_TO_THE_RESOLVE = f"""
import sys
import snapshotter.commands.pull as pull
from snapshotter import cli

def probe(channel, image, platform):
    print("sent:", *(m for m in {HEAVY!r} if m in sys.modules))
    raise SystemExit(0)

pull.send_resolve = probe
cli.main(["pull", "reg.example/app:1", "--snapshotter-address", "/nonexistent.sock", "--quiet"])
"""


def test_the_resolve_leaves_before_protobuf_and_the_unpack_modules_are_imported() -> None:
    # grpc is the one heavy import left before the daemon starts to work: the generated
    # protobuf module (about a fifth of the start-up) comes while the daemon resolves.
    done = subprocess.run([sys.executable, "-c", UP_TO_THE_RESOLVE], cwd=REPO,
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["sent:"], done.stderr


def test_the_pull_command_module_imports_no_protobuf() -> None:
    assert _loaded("import snapshotter.commands.pull;",
                   ("google.protobuf", "snapshotter._proto.daemon_pb2")) == []

"""The dependency rule of the architecture, checked on the source (pure, fast).

- fusefs and registry never import each other, nor snapshotter;
- snapshotter imports fusefs and registry through their package roots only;
- third-party libraries stay at their edges: pyfuse3 in the FUSE session/operations modules,
  httpx in registry, grpc and the generated stubs in the gRPC edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("snapshotter", "fusefs", "registry")

# Where a third-party library may be imported (module paths relative to the repository).
EDGES = {
    "pyfuse3": {"fusefs/pyfuse3_operations.py", "fusefs/session.py"},
    "httpx": {str(p.relative_to(REPO)) for p in (REPO / "registry").rglob("*.py")},
    "grpc": {"snapshotter/daemon/grpc_service.py", "snapshotter/daemon/main.py",
             "snapshotter/client/containerd_client.py", "snapshotter/commands/status.py",
             "snapshotter/commands/pull.py"},
}


def _modules() -> list[Path]:
    return sorted(
        path for package in PACKAGES for path in (REPO / package).rglob("*.py")
        if "_proto" not in path.parts
    )


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_module_follows_the_dependency_rule(path: Path) -> None:
    rel = str(path.relative_to(REPO))
    package = rel.split("/", maxsplit=1)[0]
    for name in _imports(path):
        top = name.split(".")[0]
        if package in ("fusefs", "registry"):
            forbidden = {"fusefs", "registry", "snapshotter"} - {package}
            assert top not in forbidden, f"{rel} imports {name}"
        if package == "snapshotter" and top in ("fusefs", "registry"):
            assert name == top, f"{rel} imports {name}: use the package root"
        for library, allowed in EDGES.items():
            if top == library:
                assert rel in allowed, f"{rel} imports {library} outside its edge"
        if top == "snapshotter" and "_proto" in name:
            assert rel in EDGES["grpc"], f"{rel} imports generated stubs outside a gRPC edge"

"""The dependency rule of the architecture, checked on the source (docs/architecture.md).

- fusefs and registry never import each other, nor snapshotter;
- snapshotter imports fusefs and registry through their package roots only;
- inside snapshotter, the subpackages keep their order: the store knows none of the others, the
  client and convert know neither the store nor the lazy side nor the daemon, the lazy side
  (remote) does not know the daemon, and only the CLI reaches the commands;
- third-party libraries stay at their edges: pyfuse3 in the FUSE session modules, httpx in
  registry, grpc and the generated stubs in the gRPC edges, re2 in the filter regexps,
  prometheus_client in the daemon's metrics modules;
- there is no import cycle anywhere, and importing the store loads no FUSE, trio or httpx.
"""

from __future__ import annotations

import ast
import subprocess
import sys
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
             "snapshotter/client/daemon_client.py", "snapshotter/client/resolve_send.py",
             "snapshotter/daemon/cri_proxy.py",
             "snapshotter/client/trace_recorder.py", "snapshotter/daemon/grpc_metrics.py"},
    "re2": {"snapshotter/store/filter_regexp.py"},
    "prometheus_client": {"snapshotter/daemon/metrics.py", "snapshotter/daemon/metrics_server.py"},
    "rich": {"snapshotter/commands/status.py", "snapshotter/client/progress.py",
             "snapshotter/convert/progress.py"},
}

# snapshotter's layers: a module in the key's subpackage may not import these subpackages.
# The shared top-level modules (errors, model, labels, ...) are "" and import none of them.
SUBPACKAGES = ("store", "remote", "daemon", "client", "convert", "commands", "kata")
FORBIDDEN_SUBPACKAGES = {
    "": set(SUBPACKAGES),
    "store": {"remote", "daemon", "client", "convert", "commands", "kata"},
    "client": {"store", "remote", "daemon", "convert", "commands", "kata"},
    "convert": {"store", "remote", "daemon", "commands", "kata"},
    "remote": {"daemon", "convert", "commands", "kata"},
    # The daemon composes convert's SOCI index builder for [index] publish.
    "daemon": {"commands", "kata"},
    "commands": set(),
    # The host mount helper of Kata guest-pull mode: the store's volume rules, nothing else.
    "kata": {"remote", "daemon", "client", "convert", "commands"},
}
# Top-level modules that are not shared building blocks but the CLI's entry point.
ENTRY_POINTS = {"snapshotter/cli.py"}
STORE_FORBIDDEN_LIBRARIES = {"trio", "fusefs", "registry", "grpc", "httpx", "pyfuse3", "anyio"}


def _modules() -> list[Path]:
    return sorted(
        path for package in PACKAGES for path in (REPO / package).rglob("*.py")
        if "_proto" not in path.parts
    )


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[str]:
    """Every imported module name, at any level of the file (TYPE_CHECKING and function-level
    imports included): a cycle hidden from the interpreter is still one for a reader."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


MODULES = {_module_name(path): path for path in _modules()}


def _project_imports(path: Path) -> set[str]:
    """Imported project modules; ``from package import name`` counts as the submodule when
    ``name`` is one, else as the package."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in MODULES}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in MODULES:
                    found.add(submodule)
                elif node.module in MODULES:
                    found.add(node.module)
    return found


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
            assert name == top or (name.count(".") == 1 and name.rsplit(".", 1)[0] == top), (
                f"{rel} imports {name}: use the package root"
            )
        for library, allowed in EDGES.items():
            if top == library:
                assert rel in allowed, f"{rel} imports {library} outside its edge"
        if top == "snapshotter" and "_proto" in name:
            assert rel in EDGES["grpc"], f"{rel} imports generated stubs outside a gRPC edge"


def _subpackage(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "snapshotter" or len(parts) == 1:
        return None
    return parts[1] if parts[1] in SUBPACKAGES else ""


SNAPSHOTTER_MODULES = [path for path in _modules() if path.parts[len(REPO.parts)] == "snapshotter"]


@pytest.mark.parametrize("path", SNAPSHOTTER_MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_snapshotter_subpackages_keep_their_order(path: Path) -> None:
    rel = str(path.relative_to(REPO))
    own = _subpackage(_module_name(path))
    if own is None or rel in ENTRY_POINTS:
        return
    for name in _project_imports(path):
        target = _subpackage(name)
        if target:
            assert target not in FORBIDDEN_SUBPACKAGES[own], (
                f"{rel} ({own or 'shared'}) imports {name} ({target})"
            )
    if own == "store":
        for name in _imports(path):
            assert name.split(".")[0] not in STORE_FORBIDDEN_LIBRARIES, f"{rel} imports {name}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_anywhere() -> None:
    graph = {
        module: _project_imports(path) - {module}
        for module, path in MODULES.items()
    }
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_importing_the_store_loads_no_fuse_trio_or_httpx() -> None:
    code = (
        "import sys, snapshotter.store, snapshotter.store.snapshots;"
        "print(' '.join(sorted(m for m in ('pyfuse3', 'trio', 'httpx', 'grpc', 'fusefs',"
        " 'registry') if m in sys.modules)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert loaded == []

"""What the code generators share: install freshly generated files, or check the committed ones.

Used by gen_proto.py and gen_flatbuffers.py, which run as scripts from this directory.
"""

from __future__ import annotations

import filecmp
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path


def install_or_check(
    generate: Callable[[Path], list[Path]],
    *,
    repo: Path,
    scratch: Path,
    committed: Callable[[], Iterable[str]],
    check: bool,
) -> list[str]:
    """Generate into ``scratch``; with ``check`` return the repository paths that differ or that
    the generator no longer makes (``committed`` lists what the repository holds now), otherwise
    copy every file into the repository and return nothing."""
    produced = generate(scratch)
    wanted = {str(path.relative_to(scratch)) for path in produced}
    if not check:
        for relative in wanted:
            target = repo / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(scratch / relative, target)
        return []
    stale = [
        relative for relative in sorted(wanted)
        if not (repo / relative).exists()
        or not filecmp.cmp(scratch / relative, repo / relative, shallow=False)
    ]
    return stale + sorted(set(committed()) - wanted)

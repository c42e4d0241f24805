"""Marks shared by the end-to-end test modules."""

from __future__ import annotations

import pytest


def full_stack() -> list[pytest.MarkDecorator]:
    """The marks of a test that needs root, FUSE, a containerd and a registry, and is slow.

    A new list each time: pytest keeps a module's ``pytestmark`` list and may extend it.
    """
    return [
        pytest.mark.root,
        pytest.mark.fuse,
        pytest.mark.containerd,
        pytest.mark.registry,
        pytest.mark.slow,
    ]

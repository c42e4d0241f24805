"""The installed distribution's version."""

from __future__ import annotations

from importlib import metadata

try:
    VERSION = metadata.version("lazysnap")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    VERSION = "0+unknown"

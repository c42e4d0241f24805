"""The error family of the layer formats: anything malformed or hostile is a LayerFormatError."""

from __future__ import annotations


class LayerFormatError(ValueError):
    """A blob, footer, TOC or chunk that is malformed, inconsistent, hostile or over a limit."""


class ChunkDecodeError(LayerFormatError):
    """A chunk's compressed bytes do not decode to the size the TOC promises."""


class ChunkDigestError(LayerFormatError):
    """A chunk's uncompressed bytes do not match the digest in the TOC."""

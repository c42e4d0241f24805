"""SOCI zTOC for plain gzip layers: read, write, and inflate a span from its checkpoint.

A zTOC is a FlatBuffer stored next to an image (never inside the layer): the layer's file
table with each file's place in the uncompressed tar stream, and checkpoints every few MiB
(compressed offset, bit offset, 32 KiB window) so that any span of the blob inflates on its
own. ``parse_ztoc`` turns one into a ``LayerIndex`` plus span table, ``ZtocLayer.read_chunk``
gives a chunk's verified bytes from its span, and ``build_ztoc`` writes one for a blob.
"""

from fusefs.formats.ztoc.checkpoints import WINDOW_SIZE, Checkpoint, SpanTable
from fusefs.formats.ztoc.inflate import DEFAULT_METHOD, InflateMethod, inflate_span
from fusefs.formats.ztoc.reader import ZtocLayer, parse_ztoc
from fusefs.formats.ztoc.writer import DEFAULT_SPAN_SIZE, ZtocBuild, ZtocBuildError, build_ztoc

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_SPAN_SIZE",
    "WINDOW_SIZE",
    "Checkpoint",
    "InflateMethod",
    "SpanTable",
    "ZtocBuild",
    "ZtocBuildError",
    "ZtocLayer",
    "build_ztoc",
    "inflate_span",
    "parse_ztoc",
]

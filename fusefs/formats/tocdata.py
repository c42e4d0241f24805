"""Turn the compressed TOC bytes of a blob into the TOC JSON document (pure, bounded).

Decompression is bounded by ``IndexLimits.max_toc_uncompressed`` while it runs, so a
decompression bomb costs at most that much memory.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import msgspec
import zstandard

from fusefs.formats.errors import LayerFormatError
from fusefs.formats.footer import LayerFormat, TocLocation
from fusefs.formats.limits import IndexLimits
from fusefs.formats.tocentry import TocDocument, TocEntry, entry_error

TOC_TAR_NAME = "stargz.index.json"
_BLOCK = 512
# Tar headers that may precede the TOC's own header: PAX headers and GNU long names.
_EXTENSION_TYPES = frozenset({tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME})


def toc_json_bytes(location: TocLocation, compressed: bytes, limits: IndexLimits) -> bytes:
    """The uncompressed TOC JSON of a blob whose TOC bytes are ``compressed``."""
    if len(compressed) != location.toc_length:
        raise LayerFormatError(
            f"TOC is {len(compressed)} bytes, the footer says {location.toc_length}"
        )
    if len(compressed) > limits.max_toc_compressed:
        raise LayerFormatError(
            f"compressed TOC of {len(compressed)} bytes exceeds the limit "
            f"{limits.max_toc_compressed}"
        )
    if location.format is LayerFormat.ESTARGZ:
        return _estargz_toc(compressed, limits)
    return _zstd_toc(compressed, location.toc_uncompressed, limits)


def _estargz_toc(member: bytes, limits: IndexLimits) -> bytes:
    # The member holds the TOC's tar header, the JSON and the end-of-archive blocks.
    bound = limits.max_toc_uncompressed + 8 * _BLOCK
    try:
        data = zlib.decompressobj(wbits=31).decompress(member, bound)
    except zlib.error as exc:
        raise LayerFormatError(f"eStargz TOC is not valid gzip: {exc}") from exc
    pos = 0
    for _ in range(4):
        header = data[pos : pos + _BLOCK]
        if len(header) < _BLOCK:
            break
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.TarError as exc:
            raise LayerFormatError(f"eStargz TOC tar header is invalid: {exc}") from exc
        body = pos + _BLOCK
        if info.size > limits.max_toc_uncompressed:
            raise LayerFormatError(
                f"eStargz TOC of {info.size} bytes exceeds the limit {limits.max_toc_uncompressed}"
            )
        if info.type in _EXTENSION_TYPES:
            pos = body + -(-info.size // _BLOCK) * _BLOCK
            continue
        if info.name != TOC_TAR_NAME or not info.isreg():
            raise LayerFormatError(f"eStargz TOC member is {info.name!r}, not {TOC_TAR_NAME}")
        if len(data) < body + info.size:
            raise LayerFormatError("eStargz TOC is truncated")
        return data[body : body + info.size]
    raise LayerFormatError("eStargz TOC member holds no stargz.index.json")


def _zstd_toc(compressed: bytes, expected: int | None, limits: IndexLimits) -> bytes:
    if expected is not None and expected > limits.max_toc_uncompressed:
        raise LayerFormatError(
            f"zstd:chunked TOC of {expected} bytes exceeds the limit {limits.max_toc_uncompressed}"
        )
    bound = limits.max_toc_uncompressed if expected is None else expected
    data = bounded_zstd_decompress(compressed, bound + 1, what="zstd:chunked TOC")
    if len(data) > bound:
        raise LayerFormatError(f"zstd:chunked TOC decompresses to more than {bound} bytes")
    if expected is not None and len(data) != expected:
        raise LayerFormatError(
            f"zstd:chunked TOC decompresses to {len(data)} bytes, expected {expected}"
        )
    return data


def bounded_zstd_decompress(compressed: bytes | memoryview, limit: int, *, what: str) -> bytes:
    """Decompress up to ``limit`` bytes across frames; the frames need no content size."""
    parts: list[bytes] = []
    total = 0
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(
            compressed, read_size=max(1, len(compressed)), read_across_frames=True
        )
        with reader:
            while total < limit:
                piece = reader.read(min(limit - total, 1 << 20))
                if not piece:
                    break
                parts.append(piece)
                total += len(piece)
    except zstandard.ZstdError as exc:
        raise LayerFormatError(f"{what} is not valid zstd: {exc}") from exc
    return b"".join(parts)


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_BLANKS = " \t\n\r"  # note: "" in _BLANKS is True, which only costs a no-op skip


def _skip(text: str, pos: int) -> int:
    match = _WHITESPACE.match(text, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


_DOCUMENT = msgspec.json.Decoder(TocDocument)
_ENTRY_BATCH = msgspec.json.Decoder(list[TocEntry])
_ENTRY = msgspec.json.Decoder(TocEntry)
# Entries decoded per msgspec call. Small enough that a batch's Structs and strings (about
# 0.5 MB) come and go within the same pymalloc pools, large enough that the per-call cost and
# the join stay a few ms per 50k entries.
ENTRY_BATCH_SIZE = 1024
# A key spelled with escapes needs a \u escape; to spell "entries", \u006X or \u007X.
_ESCAPED_LETTER = re.compile(rb"\\u00[67]")


def toc_entries(data: bytes, limits: IndexLimits) -> Iterable[TocEntry | dict[str, Any]]:
    """The TOC's entries, decoded by msgspec when that is known to be safe.

    msgspec checks the whole document's syntax at once and decodes the entries into typed
    TocEntry Structs in C, a batch at a time (``_decoded_in_batches``), several times faster
    than one ``json`` object per entry. But it neither stops at the entry limit nor sees a
    second ``entries`` key (the last would win). So it is used only when neither can happen:
    every entry is an object, so it needs a ``{`` of its own, and a second ``entries`` key is
    either a second literal ``"entries"`` or a key spelled with a ``\\u00[67]`` escape. Other
    documents (a file named ``entries`` at the root, say) go through ``iter_toc_entries``,
    which checks both while it walks; ``&`` escaped by Go as ``\\u0026`` keeps the fast path.
    """
    if (
        data.count(b"{") - 1 > limits.max_entries
        or data.count(b'"entries"') > 1
        or (b"\\u" in data and _ESCAPED_LETTER.search(data) is not None)
    ):
        return iter_toc_entries(data, limits)
    try:
        document = _DOCUMENT.decode(data)
    except msgspec.ValidationError as exc:
        message = str(exc)
        if message.endswith("- at `$`"):
            raise LayerFormatError("TOC JSON is not an object") from exc
        if message.endswith("- at `$.entries`"):
            raise LayerFormatError("TOC entries is not a list") from exc
        if message.endswith("- at `$.version`"):
            raise LayerFormatError(f"unsupported TOC version: {message}") from exc
        raise entry_error(message) from exc
    except (msgspec.DecodeError, RecursionError):
        # Malformed, or a name with a lone surrogate escape (\\udcXX, a byte that is not
        # UTF-8, as lazysnap's own writer keeps it), which msgspec refuses and ``json`` reads.
        return iter_toc_entries(data, limits)
    entries = document.entries
    if entries is None:
        raise LayerFormatError("TOC has no entries list")
    if len(entries) > limits.max_entries:  # cannot happen after the count above; cheap
        raise LayerFormatError(f"TOC has more than the limit of {limits.max_entries} entries")
    version = document.version
    if type(version) is not int or version != 1:
        raise LayerFormatError(f"unsupported TOC version {version!r}")
    return _decoded_in_batches(entries)


def _decoded_in_batches(raws: list[msgspec.Raw]) -> Iterator[TocEntry]:
    """TocEntry Structs of the raw ``entries``, ENTRY_BATCH_SIZE per decode.

    The document's decode already checked every entry's JSON syntax (surrogate escapes
    included), so a batch fails only on a type, a range or a field string that is not UTF-8,
    all of which the json walk rejects too: no document starts on the fast path and then
    needs the walk. Each batch is dropped when the next one is decoded.
    """
    for start in range(0, len(raws), ENTRY_BATCH_SIZE):
        batch = raws[start : start + ENTRY_BATCH_SIZE]
        try:
            entries = _ENTRY_BATCH.decode(b"[" + b",".join(batch) + b"]")
        except msgspec.ValidationError as exc:
            _raise_first_invalid(batch, start)
            # Not reached (one of the batch's entries is invalid on its own), but never let
            # msgspec's own error out.
            raise LayerFormatError(f"TOC entries from {start} on are invalid: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise LayerFormatError(f"TOC is not valid UTF-8 JSON: {exc}") from exc
        del batch
        yield from entries


def _raise_first_invalid(batch: list[msgspec.Raw], start: int) -> None:
    """Raise the error of the batch's first invalid entry, named by its place in the TOC."""
    for offset, raw in enumerate(batch):
        try:
            _ENTRY.decode(raw)
        except msgspec.ValidationError as exc:
            raise entry_error(str(exc), start + offset) from exc


def iter_toc_entries(data: bytes, limits: IndexLimits) -> Iterator[Any]:
    """The TOC's entries one JSON object at a time.

    The document is walked at its top level by hand and each entry is decoded on its own, so
    the parsed JSON never exists as a whole: only one entry's objects are alive at a time,
    which keeps the peak and the leftover heap of a 100k-entry TOC small. Malformed documents
    raise LayerFormatError; the version check happens when the iteration ends.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LayerFormatError(f"TOC is not valid UTF-8 JSON: {exc}") from exc
    decoder = json.JSONDecoder()
    version: Any = None
    seen_entries = False
    count = 0

    def decode(pos: int) -> tuple[Any, int]:
        try:
            return decoder.raw_decode(text, pos)
        except (ValueError, RecursionError) as exc:
            raise LayerFormatError(f"TOC is not valid JSON: {exc}") from exc

    def expect(pos: int, char: str, what: str) -> int:
        pos = _skip(text, pos)
        if text[pos : pos + 1] != char:
            raise LayerFormatError(f"TOC is not valid JSON: expected {what} at {pos}")
        return _skip(text, pos + 1)

    if text[_skip(text, 0) : _skip(text, 0) + 1] != "{":
        raise LayerFormatError("TOC JSON is not an object")
    pos = expect(0, "{", "an object")
    if text[pos : pos + 1] == "}":
        pos += 1
    else:
        while True:
            if text[pos : pos + 1] != '"':
                raise LayerFormatError(f"TOC is not valid JSON: expected a key at {pos}")
            key, pos = decode(pos)
            pos = expect(pos, ":", "':'")
            if key == "entries":
                if seen_entries:
                    raise LayerFormatError("TOC has two entries lists")
                seen_entries = True
                if text[pos : pos + 1] != "[":
                    raise LayerFormatError("TOC entries is not a list")
                pos = _skip(text, pos + 1)
                if text[pos : pos + 1] == "]":
                    pos += 1
                else:
                    while True:
                        entry, pos = decode(pos)
                        count += 1
                        if count > limits.max_entries:
                            raise LayerFormatError(
                                f"TOC has more than the limit of {limits.max_entries} entries"
                            )
                        yield entry
                        separator = text[pos : pos + 1]
                        if separator in _BLANKS:
                            pos = _skip(text, pos)
                            separator = text[pos : pos + 1]
                        pos += 1
                        if text[pos : pos + 1] in _BLANKS:
                            pos = _skip(text, pos)
                        if separator == "]":
                            break
                        if separator != ",":
                            raise LayerFormatError("TOC is not valid JSON: bad entries list")
            else:
                value, pos = decode(pos)
                if key == "version":
                    version = value
            pos = _skip(text, pos)
            separator = text[pos : pos + 1]
            pos = _skip(text, pos + 1)
            if separator == "}":
                break
            if separator != ",":
                raise LayerFormatError("TOC is not valid JSON: bad object")
    if _skip(text, pos) != len(text):
        raise LayerFormatError("TOC is not valid JSON: data after the document")
    if not seen_entries:
        raise LayerFormatError("TOC has no entries list")
    if type(version) is not int or version != 1:
        raise LayerFormatError(f"unsupported TOC version {version!r}")


def sha256_digest(data: bytes | memoryview) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()

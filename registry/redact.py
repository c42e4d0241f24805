"""What of a URL may be shown: presigned redirect URLs and token requests carry secrets in the
query (``X-Amz-Signature``, ``account``...), so logs and errors show a URL without it."""

from __future__ import annotations

import re
import urllib.parse

import httpx

# A URL with a query inside free text, e.g. in a library's exception message.
_URL_QUERY = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#'\"]*)[?#][^\s'\"]*")


def safe_url(url: str | httpx.URL) -> str:
    """The URL without query or fragment."""
    parts = urllib.parse.urlsplit(str(url))
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def redact_urls(text: str) -> str:
    """``text`` with the query and fragment of every URL in it removed."""
    return _URL_QUERY.sub(r"\1", text)

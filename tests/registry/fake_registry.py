"""An in-memory registry behind ``httpx.MockTransport`` for unit tests.

It speaks enough of the distribution API (manifests, blobs with ranges, uploads, token auth,
Basic auth, redirects) and can be told to misbehave per request through ``faults``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import trio

from registry import ClientOptions, RegistryClient, StaticCredentials
from registry.credentials import Credentials
from registry.hosts import HostsConfig, RegistryHost

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
Fault = Callable[[httpx.Request], "httpx.Response | None"]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def oci_error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
    return httpx.Response(status, content=body, headers=headers or {})


@dataclass
class FakeRegistry:
    host: str = "reg.test"
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # tag/digest -> body
    blobs: dict[str, bytes] = field(default_factory=dict)
    auth: str | None = None  # None, "basic" or "bearer"
    username: str = "alice"
    password: str = "s3cret"
    token_lifetime: int = 300
    ranges: bool = True
    redirect_blobs_to: str | None = None  # e.g. "https://storage.test"
    storage_sig: str = "SECRET"  # the presigned URL's signature; change it to expire old ones
    faults: list[Fault] = field(default_factory=list)
    requests: list[httpx.Request] = field(default_factory=list)
    issued_tokens: list[str] = field(default_factory=list)
    revoked_tokens: set[str] = field(default_factory=set)
    uploads: dict[str, bytearray] = field(default_factory=dict)
    delay: float = 0.0
    # Subject digest -> referrers index body. None: no referrers API (a 404, as registry 2.8).
    referrers: dict[str, bytes] | None = None

    # -- content --------------------------------------------------------------------------

    def add_blob(self, data: bytes) -> str:
        digest = digest_of(data)
        self.blobs[digest] = data
        return digest

    def add_manifest(self, body: bytes, media_type: str, tag: str | None = None) -> str:
        digest = digest_of(body)
        self.manifests[digest] = (body, media_type)
        if tag:
            self.manifests[tag] = (body, media_type)
        return digest

    # -- auth -----------------------------------------------------------------------------

    def _authorized(self, request: httpx.Request) -> bool:
        header = request.headers.get("authorization", "")
        if self.auth is None:
            return True
        if self.auth == "basic":
            expected = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            return bool(header == f"Basic {expected}")
        token = header.removeprefix("Bearer ")
        return bool(
            header.startswith("Bearer ")
            and token in self.issued_tokens
            and token not in self.revoked_tokens
        )

    def _challenge(self, request: httpx.Request) -> httpx.Response:
        if self.auth == "basic":
            value = 'Basic realm="fake"'
        else:
            repo = request.url.path.split("/")[2:-2]
            value = (
                f'Bearer realm="https://auth.test/token",service="{self.host}",'
                f'scope="repository:{"/".join(repo)}:pull"'
            )
        return oci_error(
            401, "UNAUTHORIZED", "authentication required", {"WWW-Authenticate": value}
        )

    def _token(self, request: httpx.Request) -> httpx.Response:
        header = request.headers.get("authorization")
        if header is not None:
            expected = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            if header != f"Basic {expected}":
                return httpx.Response(401, json={"details": "bad credentials"})
        token = f"tok{len(self.issued_tokens)}"
        self.issued_tokens.append(token)
        return httpx.Response(200, json={"token": token, "expires_in": self.token_lifetime})

    # -- dispatch -------------------------------------------------------------------------

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.delay:
            await trio.sleep(self.delay)
        if self.faults:
            response = self.faults.pop(0)(request)
            if response is not None:
                return response
        if request.url.host == "auth.test":
            return self._token(request)
        if request.url.host == "storage.test":
            return self._storage(request)
        if not self._authorized(request):
            return self._challenge(request)
        path = request.url.path
        if path == "/v2/":
            return httpx.Response(200, json={})
        m = re.fullmatch(r"/v2/(.+)/manifests/(.+)", path)
        if m:
            return self._manifest(request, m.group(2))
        m = re.fullmatch(r"/v2/(.+)/referrers/(.+)", path)
        if m and self.referrers is not None:
            empty = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
            body = self.referrers.get(m.group(2), empty.encode())
            return httpx.Response(200, content=body, headers={"Content-Type": OCI_INDEX})
        m = re.fullmatch(r"/v2/(.+)/blobs/uploads/(.*)", path)
        if m:
            return self._upload(request, m.group(1), m.group(2))
        m = re.fullmatch(r"/v2/(.+)/blobs/(sha256:[0-9a-f]{64})", path)
        if m:
            if self.redirect_blobs_to and request.method == "GET":
                return httpx.Response(
                    307,
                    headers={
                        "Location": f"{self.redirect_blobs_to}/b/{m.group(2)}?sig={self.storage_sig}"
                    },
                )
            return self._blob(request, m.group(2))
        return oci_error(404, "NAME_UNKNOWN", "no such route")

    def _manifest(self, request: httpx.Request, obj: str) -> httpx.Response:
        if request.method == "PUT":
            body = request.content
            self.add_manifest(body, request.headers["content-type"], None if ":" in obj else obj)
            return httpx.Response(201, headers={"Docker-Content-Digest": digest_of(body)})
        found = self.manifests.get(obj)
        if found is None:
            return oci_error(404, "MANIFEST_UNKNOWN", f"manifest {obj} unknown")
        body, media_type = found
        headers = {"Content-Type": media_type, "Docker-Content-Digest": digest_of(body)}
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(body))
            return httpx.Response(200, headers=headers)
        return httpx.Response(200, content=body, headers=headers)

    def _blob(self, request: httpx.Request, digest: str) -> httpx.Response:
        data = self.blobs.get(digest)
        if data is None:
            return oci_error(404, "BLOB_UNKNOWN", f"blob {digest} unknown")
        if request.method == "HEAD":
            return httpx.Response(200, headers={"Content-Length": str(len(data))})
        range_header = request.headers.get("range")
        if range_header and self.ranges:
            m = re.fullmatch(r"bytes=(\d+)-(\d+)", range_header)
            assert m, range_header
            start, end = int(m.group(1)), int(m.group(2))
            if start >= len(data):
                return oci_error(416, "RANGE_INVALID", "range not satisfiable")
            end = min(end, len(data) - 1)
            return httpx.Response(
                206,
                content=data[start : end + 1],
                headers={"Content-Range": f"bytes {start}-{end}/{len(data)}"},
            )
        return httpx.Response(200, content=data)

    def _storage(self, request: httpx.Request) -> httpx.Response:
        if request.url.params.get("sig") != self.storage_sig:
            return httpx.Response(403, text="AccessDenied")
        digest = request.url.path.rsplit("/", 1)[1]
        return self._blob(request, digest)

    def _upload(self, request: httpx.Request, repo: str, session: str) -> httpx.Response:
        if request.method == "POST":
            mount = request.url.params.get("mount")
            if mount and mount in self.blobs:
                return httpx.Response(201, headers={"Location": f"/v2/{repo}/blobs/{mount}"})
            sid = f"u{len(self.uploads)}"
            self.uploads[sid] = bytearray()
            return httpx.Response(
                202, headers={"Location": f"/v2/{repo}/blobs/uploads/{sid}?_state=x"}
            )
        buffer = self.uploads[session]
        if request.method == "PATCH":
            buffer.extend(request.content)
            return httpx.Response(
                202, headers={"Location": f"/v2/{repo}/blobs/uploads/{session}?_state=y"}
            )
        if request.method == "PUT":
            buffer.extend(request.content)
            digest = request.url.params["digest"]
            if digest_of(bytes(buffer)) != digest:
                return oci_error(400, "DIGEST_INVALID", "digest mismatch")
            self.blobs[digest] = bytes(buffer)
            return httpx.Response(201, headers={"Location": f"/v2/{repo}/blobs/{digest}"})
        return oci_error(405, "UNSUPPORTED", "method")


FAST = ClientOptions(
    connect_timeout=2, read_timeout=2, request_timeout=2, backoff_initial=0.001, backoff_max=0.01
)


class FixedHosts(HostsConfig):
    """A hosts config that answers from a dict instead of a directory."""

    def __init__(self, hosts: dict[str, list[RegistryHost]]) -> None:
        super().__init__("/nonexistent")
        self._hosts = hosts

    def hosts_for(self, registry: str) -> list[RegistryHost]:
        return self._hosts.get(registry) or super().hosts_for(registry)


def make_client(
    fake: FakeRegistry,
    *,
    credentials: Credentials | None = None,
    options: ClientOptions = FAST,
    hosts: dict[str, list[RegistryHost]] | None = None,
    handler: Callable[[httpx.Request], object] | None = None,
) -> RegistryClient:
    creds = StaticCredentials({fake.host: credentials}) if credentials else None
    config = FixedHosts(hosts or {fake.host: [RegistryHost(f"https://{fake.host}/v2")]})
    transport = httpx.MockTransport(handler or fake.handle)  # type: ignore[arg-type]
    return RegistryClient(config, creds, options, _transport_factory=lambda _host: transport)

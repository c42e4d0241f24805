"""A small token server for the registry's ``auth: token`` mode, so the Bearer dance runs for real.

It signs RS256 JWTs with a throwaway key (the openssl CLI does the signing) and puts the
certificate in the ``x5c`` header; the registry trusts it through ``rootcertbundle``.
Users authenticate with Basic credentials (GET) or a refresh token (POST, OAuth2 form).
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.integration.registry_support.tls import make_self_signed_rsa

ISSUER = "lazysnap-test-issuer"
SERVICE = "lazysnap-test-registry"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenServer:
    url: str  # the realm
    cert: Path
    key: Path
    users: dict[str, str]
    refresh_tokens: dict[str, str]  # refresh token -> user
    anonymous_pull: bool
    lifetime: int
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def registry_auth_config(self) -> dict[str, Any]:
        """The ``auth`` section for docker-registry's config."""
        return {
            "token": {
                "realm": self.url,
                "service": SERVICE,
                "issuer": ISSUER,
                "rootcertbundle": str(self.cert),
            }
        }

    def _sign(self, signing_input: bytes) -> bytes:
        result = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input,
            capture_output=True,
            check=True,
            timeout=30,
        )
        return result.stdout

    def issue(self, subject: str, access: list[dict[str, Any]]) -> str:
        der = ssl.PEM_cert_to_DER_cert(self.cert.read_text())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": now + self.lifetime,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        ).encode()
        return signing_input.decode() + "." + _b64url(self._sign(signing_input))

    def grant(self, user: str | None, scopes: list[str]) -> list[dict[str, Any]]:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository" or not name:
                continue
            wanted = [a for a in actions.split(",") if a]
            allowed = wanted if user else (["pull"] if self.anonymous_pull else [])
            granted = [a for a in wanted if a in allowed]
            if granted:
                access.append({"type": "repository", "name": name, "actions": granted})
        return access


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def _answer(self, status: int, doc: Mapping[str, Any]) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _issue(self, user: str | None, params: Mapping[str, list[str]]) -> None:
        ts = self.server.token_server
        scopes = [s for value in params.get("scope", []) for s in value.split(" ") if s]
        with ts.lock:
            ts.requests.append(
                {"user": user, "scopes": scopes, "service": params.get("service", [""])[0]}
            )
        token = ts.issue(user or "", ts.grant(user, scopes))
        self._answer(200, {"token": token, "access_token": token, "expires_in": ts.lifetime})

    def do_GET(self) -> None:
        ts = self.server.token_server
        params = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        user = None
        header = self.headers.get("Authorization")
        if header:
            scheme, _, value = header.partition(" ")
            try:
                name, _, password = base64.b64decode(value).decode().partition(":")
            except ValueError:
                name, password = "", ""
            if scheme.lower() != "basic" or ts.users.get(name) != password or not name:
                self._answer(401, {"details": "invalid credentials"})
                return
            user = name
        self._issue(user, params)

    def do_POST(self) -> None:
        ts = self.server.token_server
        length = int(self.headers.get("Content-Length", "0"))
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        if form.get("grant_type") != ["refresh_token"]:
            self._answer(400, {"details": "unsupported grant_type"})
            return
        user = ts.refresh_tokens.get(form.get("refresh_token", [""])[0])
        if user is None:
            self._answer(401, {"details": "invalid refresh token"})
            return
        self._issue(user, form)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    token_server: TokenServer


@contextlib.contextmanager
def run_token_server(
    workdir: Path,
    *,
    users: Mapping[str, str],
    refresh_tokens: Mapping[str, str] | None = None,
    anonymous_pull: bool = True,
    lifetime: int = 300,
) -> Iterator[TokenServer]:
    cert, key = make_self_signed_rsa(workdir, "token")
    server = _Server(("127.0.0.1", 0), _Handler)
    port = server.server_address[1]
    ts = TokenServer(
        f"http://127.0.0.1:{port}/token",
        cert,
        key,
        dict(users),
        dict(refresh_tokens or {}),
        anonymous_pull,
        lifetime,
    )
    server.token_server = ts
    thread = threading.Thread(target=server.serve_forever, name="token-server", daemon=True)
    thread.start()
    try:
        yield ts
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)

"""A development stand-in for GitHub Actions' OIDC token service (no Django).

It signs GitHub-shaped ID tokens with its own RSA key, publishes the public half at
``/.well-known/jwks`` and hands tokens out at ``/token`` the way a workflow step asks for
them (``GET $ACTIONS_ID_TOKEN_REQUEST_URL&audience=...`` with ``Authorization: bearer ...``).

Use it in-process (tests)::

    with DevOidcIssuer(repository="acme/agents", repository_id="42") as issuer:
        token = issuer.mint(run_id="123", aud="agent-provisioning")
        bad = issuer.mint(aud="someone-else")          # any claim can be overridden
        no_jti = issuer.mint(jti=None)                  # None removes a claim

or as a process for ``make run``::

    python -m provisioning.localdev.oidc_issuer --port 8702 --repository acme/agents ...
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import signal
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

DEFAULT_REPOSITORY = "example/agent-provisioning"
DEFAULT_REPOSITORY_ID = "100000001"
DEFAULT_WORKFLOW_FILE = "provision.yml"
DEFAULT_REF = "main"
DEFAULT_REQUEST_TOKEN = "local-request-token"  # noqa: S105 - a development value, not a secret
DEFAULT_AUDIENCE = "agent-provisioning"
TOKEN_LIFETIME_SECONDS = 300  # GitHub's tokens live about five minutes


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _generate_private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _public_jwk(private_key: rsa.RSAPrivateKey) -> dict[str, Any]:
    jwk = RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    # RFC 7638 thumbprint as the key id: stable for a key, different for every other key.
    canonical = json.dumps(
        {"e": jwk["e"], "kty": jwk["kty"], "n": jwk["n"]}, separators=(",", ":"), sort_keys=True
    )
    jwk["kid"] = _b64url(hashlib.sha256(canonical.encode()).digest())
    jwk["alg"] = "RS256"
    jwk["use"] = "sig"
    return jwk


def load_or_create_key(path: str | os.PathLike[str]) -> rsa.RSAPrivateKey:
    """Load a PEM private key from ``path``; create (mode 0600) and save one if it's missing."""
    key_path = Path(path)
    if key_path.exists():
        loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(loaded, rsa.RSAPrivateKey):
            raise ValueError(f"{key_path} does not hold an RSA private key")
        return loaded
    key = _generate_private_key()
    key_path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return key


class DevOidcIssuer:
    """Mints GitHub Actions-like ID tokens and serves its JWKS over loopback HTTP.

    ``issuer`` defaults to the server's own base URL (known once it is bound). Keys:
    ``add_key(publish=...)`` makes another one (for rotation, or an unpublished "unknown" kid);
    ``active_kid`` signs by default. ``claim_overrides`` applies to every token the HTTP
    endpoint hands out, so an end-to-end test can make the runner's tokens wrong on purpose.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        repository: str = DEFAULT_REPOSITORY,
        repository_id: str = DEFAULT_REPOSITORY_ID,
        workflow_file: str = DEFAULT_WORKFLOW_FILE,
        ref: str = DEFAULT_REF,
        request_token: str = DEFAULT_REQUEST_TOKEN,
        issuer: str | None = None,
        audience: str = DEFAULT_AUDIENCE,
        actor_id: str = "1000001",
        repository_owner_id: str = "1000000",
        private_key: rsa.RSAPrivateKey | None = None,
        key_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.repository = repository
        self.repository_id = str(repository_id)
        self.workflow_file = workflow_file
        self.ref = ref.removeprefix("refs/heads/")
        self.request_token = request_token
        self.audience = audience
        self.actor_id = str(actor_id)
        self.repository_owner_id = str(repository_owner_id)
        self._issuer = issuer.rstrip("/") if issuer else None
        self.claim_overrides: dict[str, Any] = {}
        self.tokens_issued = 0

        self._lock = threading.Lock()
        self._keys: dict[str, rsa.RSAPrivateKey] = {}
        self._jwks: dict[str, dict[str, Any]] = {}  # published keys only
        if private_key is None and key_path is not None:
            private_key = load_or_create_key(key_path)
        self.active_kid = self.add_key(private_key=private_key)

        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- keys ----------------------------------------------------------------------------------

    def add_key(
        self,
        *,
        publish: bool = True,
        activate: bool = False,
        private_key: rsa.RSAPrivateKey | None = None,
    ) -> str:
        """Make (or adopt) a signing key and return its kid.

        ``publish=False`` keeps it out of the JWKS (a kid the verifier cannot know);
        ``activate=True`` signs new tokens with it (a rotation).
        """
        key = private_key or _generate_private_key()
        jwk = _public_jwk(key)
        kid: str = jwk["kid"]
        with self._lock:
            self._keys[kid] = key
            if publish:
                self._jwks[kid] = jwk
            if activate:
                self.active_kid = kid
        return kid

    def rotate_key(self, *, retire_old: bool = False) -> str:
        """Publish a new key and sign with it from now on; optionally unpublish the old one."""
        old = self.active_kid
        kid = self.add_key(publish=True, activate=True)
        if retire_old:
            self.unpublish_key(old)
        return kid

    def publish_key(self, kid: str) -> None:
        with self._lock:
            self._jwks[kid] = _public_jwk(self._keys[kid])

    def unpublish_key(self, kid: str) -> None:
        with self._lock:
            self._jwks.pop(kid, None)

    def jwks(self) -> dict[str, Any]:
        with self._lock:
            return {"keys": [dict(jwk) for jwk in self._jwks.values()]}

    def write_jwks(self, path: str | os.PathLike[str]) -> Path:
        """Write the current JWKS to a file (for verifiers configured with a file path)."""
        target = Path(path)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(self.jwks()))
        tmp.replace(target)  # atomic, so a concurrent reader never sees half a file
        return target

    # -- tokens --------------------------------------------------------------------------------

    @property
    def issuer(self) -> str:
        if self._issuer:
            return self._issuer
        return self.base_url

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def jwks_url(self) -> str:
        return f"{self.base_url}/.well-known/jwks"

    @property
    def workflow_ref(self) -> str:
        return f"{self.repository}/.github/workflows/{self.workflow_file}@refs/heads/{self.ref}"

    def token_request_url(self, *, run_id: str, run_attempt: int | str = 1) -> str:
        """What a workflow step finds in ``ACTIONS_ID_TOKEN_REQUEST_URL``."""
        return f"{self.base_url}/token?run_id={run_id}&run_attempt={run_attempt}"

    def claims(
        self,
        *,
        run_id: str | int = "1",
        run_attempt: str | int = 1,
        audience: str | None = None,
        now: int | None = None,
    ) -> dict[str, Any]:
        """The claims GitHub would put in a workflow_dispatch run's token (all strings)."""
        now = int(time.time()) if now is None else now
        owner = self.repository.split("/", 1)[0]
        return {
            "jti": str(uuid.uuid4()),
            "sub": f"repo:{self.repository}:environment:production",
            "aud": audience or self.audience,
            "ref": f"refs/heads/{self.ref}",
            "sha": "0" * 40,
            "repository": self.repository,
            "repository_id": self.repository_id,
            "repository_owner": owner,
            "repository_owner_id": self.repository_owner_id,
            "repository_visibility": "private",
            "run_id": str(run_id),
            "run_number": "1",
            "run_attempt": str(run_attempt),
            "actor": "local-dev",
            "actor_id": self.actor_id,
            "workflow": "provision",
            "workflow_ref": self.workflow_ref,
            "workflow_sha": "0" * 40,
            "job_workflow_ref": self.workflow_ref,
            "job_workflow_sha": "0" * 40,
            "head_ref": "",
            "base_ref": "",
            "event_name": "workflow_dispatch",
            "ref_type": "branch",
            "ref_protected": "true",
            "environment": "production",
            "runner_environment": "github-hosted",
            "iss": self.issuer,
            "nbf": now - 5,
            "iat": now,
            "exp": now + TOKEN_LIFETIME_SECONDS,
        }

    def mint(
        self,
        *,
        kid: str | None = None,
        sign_with: str | None = None,
        algorithm: str = "RS256",
        run_id: str | int | None = "1",
        run_attempt: str | int | None = 1,
        **overrides: Any,
    ) -> str:
        """Sign a token. Keyword overrides replace claims; a ``None`` value removes the claim.

        ``kid`` is the header's key id (default: the active key); ``sign_with`` the kid of the
        key that actually signs (default: ``kid``) - differing makes a bad signature.
        """
        claims = self.claims(run_id=run_id or "", run_attempt=run_attempt or "")
        overrides.setdefault("run_id", run_id)
        overrides.setdefault("run_attempt", None if run_attempt is None else str(run_attempt))
        for name, value in overrides.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        with self._lock:
            header_kid = kid or self.active_kid
            key = self._keys[sign_with or header_kid]
            self.tokens_issued += 1
        return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": header_kid})

    # -- HTTP server ---------------------------------------------------------------------------

    def start(self) -> DevOidcIssuer:
        if self._server is not None:
            return self
        server = ThreadingHTTPServer((self.host, self.port), _make_handler(self))
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="dev-oidc-issuer", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def serve_forever(self, *, on_ready: Callable[[DevOidcIssuer], None] | None = None) -> None:
        """Run in the foreground (the CLI) until interrupted or sent SIGTERM."""
        server = ThreadingHTTPServer((self.host, self.port), _make_handler(self))
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        if on_ready is not None:
            on_ready(self)
        try:
            server.serve_forever()
        finally:
            server.server_close()
            self._server = None

    def __enter__(self) -> DevOidcIssuer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # called by the handler
    def _token_for_request(self, query: Mapping[str, list[str]]) -> str:
        def first(name: str, default: str | None = None) -> str | None:
            values = query.get(name)
            return values[0] if values else default

        run_id = first("run_id")
        if not run_id:
            raise ValueError("run_id is required")
        overrides = dict(self.claim_overrides)
        return self.mint(
            run_id=run_id,
            run_attempt=first("run_attempt", "1") or "1",
            aud=first("audience") or self.audience,
            **overrides,
        )


def _make_handler(issuer: DevOidcIssuer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "DevOidcIssuer/1"

        def log_message(self, format: str, *args: Any) -> None:
            if os.environ.get("DEV_OIDC_ISSUER_VERBOSE"):
                super().log_message(format, *args)

        def _send_json(self, status: HTTPStatus, body: Mapping[str, Any]) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/.well-known/jwks":
                self._send_json(HTTPStatus.OK, issuer.jwks())
            elif url.path == "/.well-known/openid-configuration":
                self._send_json(
                    HTTPStatus.OK,
                    {
                        "issuer": issuer.issuer,
                        "jwks_uri": issuer.jwks_url,
                        "id_token_signing_alg_values_supported": ["RS256"],
                        "response_types_supported": ["id_token"],
                        "subject_types_supported": ["public"],
                    },
                )
            elif url.path == "/token":
                self._token(parse_qs(url.query))
            else:
                self._send_json(HTTPStatus.NOT_FOUND, {"message": "Not Found"})

        def _token(self, query: Mapping[str, list[str]]) -> None:
            scheme, _, presented = self.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                presented.strip().encode(), issuer.request_token.encode()
            ):
                self._send_json(HTTPStatus.UNAUTHORIZED, {"message": "Bad request token"})
                return
            try:
                token = issuer._token_for_request(query)
            except ValueError as exc:
                self._send_json(HTTPStatus.BAD_REQUEST, {"message": str(exc)})
                return
            self._send_json(HTTPStatus.OK, {"count": 1, "value": token})

    return Handler


def main(argv: list[str] | None = None) -> None:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m provisioning.localdev.oidc_issuer",
        description="Development OIDC issuer that mints GitHub Actions-like ID tokens.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8702)
    parser.add_argument("--repository", default=env("GITHUB_REPOSITORY", DEFAULT_REPOSITORY))
    parser.add_argument(
        "--repository-id", default=env("GITHUB_REPOSITORY_ID", DEFAULT_REPOSITORY_ID)
    )
    parser.add_argument(
        "--workflow-file", default=env("GITHUB_WORKFLOW_FILE", DEFAULT_WORKFLOW_FILE)
    )
    parser.add_argument("--ref", default=env("GITHUB_REF", DEFAULT_REF))
    parser.add_argument(
        "--request-token", default=env("LOCAL_OIDC_REQUEST_TOKEN", DEFAULT_REQUEST_TOKEN)
    )
    parser.add_argument(
        "--issuer", default=None, help="the iss claim (default: this server's base URL)"
    )
    parser.add_argument(
        "--audience",
        default=env("PROVISIONING_OIDC_AUDIENCE", DEFAULT_AUDIENCE),
        help="audience when a request names none",
    )
    parser.add_argument("--key-path", default=None, help="PEM private key; created if missing")
    args = parser.parse_args(argv)

    issuer = DevOidcIssuer(
        host=args.host,
        port=args.port,
        repository=args.repository,
        repository_id=args.repository_id,
        workflow_file=args.workflow_file,
        ref=args.ref,
        request_token=args.request_token or secrets.token_urlsafe(16),
        issuer=args.issuer,
        audience=args.audience,
        key_path=args.key_path,
    )

    def announce(ready: DevOidcIssuer) -> None:
        print(
            f"dev OIDC issuer on {ready.base_url} (iss={ready.issuer}, "
            f"repository={ready.repository} id {ready.repository_id}, ref {ready.ref})",
            flush=True,
        )

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with contextlib.suppress(KeyboardInterrupt):
        issuer.serve_forever(on_ready=announce)


if __name__ == "__main__":
    main()

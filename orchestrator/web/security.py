"""Who may read and act: basic auth on every page, CSRF checks on every action, headers that keep the
pages from being framed or fed foreign scripts.

Basic auth is what Flower uses, so one convention covers both (credentials from the environment, checked
by `orchestrator.cli.credentials`). Because a browser sends cached basic credentials with any request to
the site, a foreign page could otherwise make it POST a cancel: every POST must carry a signed
double-submit token (a random nonce and its HMAC under a key this process made, in an HttpOnly
SameSite=Strict cookie and again in the form) and come from this origin (Origin, when sent, must name the
host the request was sent to; Sec-Fetch-Site must not be cross-site or same-site).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSRF_COOKIE = "orchestrator_csrf"
CSRF_FIELD = "csrf"
#: Paths served without credentials: the health check answers "ok" and nothing else.
OPEN_PATHS = frozenset({"/healthz"})

SECURITY_HEADERS = {
    # Only this server's own CSS and JS; no inline script or style, no plugins, no framing.
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}


class BasicAuth:
    """ASGI middleware: every HTTP request but OPEN_PATHS needs one of `credentials` ({user: password}),
    or gets 401 with a Basic challenge. The authenticated user is put in scope["state"]["user"]."""

    def __init__(self, app: ASGIApp, credentials: Mapping[str, str], realm: str = "orchestrator") -> None:
        if not credentials:
            raise ValueError("BasicAuth needs at least one user")
        self.app = app
        self._pairs = [(u.encode(), p.encode()) for u, p in credentials.items()]
        self._challenge = f'Basic realm="{realm}", charset="UTF-8"'

    def user(self, authorization: str | None) -> str | None:
        """The user the header proves, else None. Every pair is compared, in constant time."""
        if not authorization:
            return None
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        user, sep, password = decoded.partition(b":")
        if not sep:
            return None
        found = None
        for known_user, known_password in self._pairs:
            if hmac.compare_digest(user, known_user) & hmac.compare_digest(password, known_password):
                found = known_user
        return None if found is None else found.decode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        user = self.user(Headers(scope=scope).get("authorization"))
        if user is None:
            response = PlainTextResponse(
                "401 Unauthorized: this server needs a user and password",
                status_code=401,
                headers={"WWW-Authenticate": self._challenge},
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["user"] = user
        await self.app(scope, receive, send)


class SecurityHeaders:
    """ASGI middleware adding SECURITY_HEADERS to every response, and no-store to every page: the pages
    show data behind credentials, which shared caches must not keep."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    headers.setdefault(key, value)
                if not static:
                    headers.setdefault("cache-control", "no-store")
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Csrf:
    """Signed double-submit tokens: `issue()` makes one for the cookie and the forms; `refusal()` says
    why a POST is refused, or None when it carries a valid token and comes from this origin."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def _sign(self, nonce: str) -> str:
        return hmac.new(self._key, nonce.encode(), hashlib.sha256).hexdigest()

    def issue(self) -> str:
        nonce = secrets.token_urlsafe(24)
        return f"{nonce}.{self._sign(nonce)}"

    def valid(self, token: str | None) -> bool:
        if not token:
            return False
        nonce, _, signature = token.partition(".")
        return bool(nonce) and hmac.compare_digest(signature.encode(), self._sign(nonce).encode())

    def token_for(self, request: Request) -> tuple[str, bool]:
        """The request's cookie token when it is valid, else a new one; and whether it is new (and so
        must be set as the cookie)."""
        current = request.cookies.get(CSRF_COOKIE)
        if current is not None and self.valid(current):
            return current, False
        return self.issue(), True

    def refusal(self, request: Request, submitted: str | None) -> str | None:
        headers = request.headers
        site = headers.get("sec-fetch-site")
        if site in ("cross-site", "same-site"):
            return f"the request came from another site (Sec-Fetch-Site: {site})"
        origin = headers.get("origin")
        if origin is not None:
            host = headers.get("host", "")
            if origin == "null" or urlsplit(origin).netloc.lower() != host.lower():
                return "the request came from another origin"
        cookie = request.cookies.get(CSRF_COOKIE)
        if not self.valid(cookie) or not submitted or not hmac.compare_digest(cookie or "", submitted):
            return "the form's CSRF token is missing or does not match: reload the page and try again"
        return None

"""A FHIR R4 server double over real HTTP, for tests anywhere in the project.

Runs a threaded :mod:`http.server` on ``127.0.0.1`` with an OS-chosen port, so tests exercise
the real network stack (httpx, timeouts, retries, connection drops) without a JVM::

    from tests.fakes.fhir_server import FakeFhirServer

    with FakeFhirServer() as srv:
        srv.put({"resourceType": "Patient", "id": "p1"})
        client = FhirClient(srv.base_url)
        client.read("Patient", "p1")
        assert srv.requests[-1].path == "/fhir/Patient/p1"

URL layout (``srv.origin`` = ``http://127.0.0.1:PORT``, ``srv.base_url`` = ``origin + "/fhir"``):

=============================================  ==========================================================
``GET  {base}/metadata``                        CapabilityStatement (public)
``GET  {base}/.well-known/smart-configuration``  SMART configuration (public)
``POST {origin}/auth/token``                    SMART Backend Services token endpoint (``srv.token_url``)
``GET  {base}/{T}/{id}`` / ``_history/{v}``      read / vread (404 unknown, 410 deleted); ``_history`` list
``GET  {base}/{T}/_history?_since=…``           type history: versions and deletions, newest first, paged
``GET  {base}/{T}?…``, ``POST {base}/{T}/_search``  search → searchset Bundle with ``next`` links
``POST {base}/{T}``                             create (``If-None-Exist`` honoured)
``PUT  {base}/{T}/{id}``                        update / create-with-id (``If-Match`` honoured)
``PUT  {base}/{T}?identifier=s|v``               conditional update (0 → create, 1 → update, >1 → 412)
``DELETE {base}/{T}/{id}``                      delete
``GET|POST {base}/$export``, ``Patient/$export``, ``Group/{id}/$export``  Bulk Data kick-off
``GET|DELETE {origin}/bulk/status/{job}``        bulk status polling / cancel
``GET  {origin}/bulk/files/{job}/{T}.ndjson``    bulk output files
``GET|POST {base}/Subscription/{id}/$events``    Backport ``$events`` (stored events by number range)
``GET  {base}/Subscription/{id}/$status``        Backport ``$status`` (also type level, ``?id=``)
=============================================  ==========================================================

Search parameters: ``_id``, ``patient``, ``subject``, ``code`` (``system|code``, ``|code``,
``code``, ``system|``; comma = OR), ``identifier``, ``status``, ``clinical-status``,
``category``, ``_lastUpdated`` and ``date`` (prefixes ``eq ne gt ge lt le sa eb``; repeat for a
range), ``_count``, ``_sort`` (``date``, ``_lastUpdated``, ``_id``; ``-`` for descending; missing
values last). Other parameters are ignored (``strict_search=True`` makes them a 400, like a
strict server). Writes over HTTP that change nothing do not bump the version (as HAPI does);
:meth:`FakeFhirServer.put` always does.

Versioning: every stored version has ``meta.versionId`` (1, 2, …) and a strictly increasing
``meta.lastUpdated``; responses carry ``ETag: W/"n"`` and ``Last-Modified``.

Auth: ``required_token="t"`` (or ``require_auth=True``) makes every FHIR and bulk endpoint
except ``metadata`` and the SMART configuration answer 401 without ``Authorization: Bearer``
of that token or of one issued by the token endpoint. The token endpoint verifies the client
assertion (signature against the registered public key by ``kid``, ``alg`` RS384/ES384,
``iss`` = ``sub`` = client id, ``aud`` = token URL, ``exp`` at most 5 minutes ahead, ``jti``
not replayed) - register clients with ``smart_clients={"id": keypair}`` or
:meth:`FakeFhirServer.register_smart_client`; make keys with :func:`make_keypair`.

Failure injection (checked before routing, in insertion order, each consumed ``times`` times):
:meth:`FakeFhirServer.fail_next` (``n`` failures with a status and optional ``Retry-After``),
:meth:`FakeFhirServer.add_rule` with a :class:`FailureRule` (path regex, method, status,
latency, dropped connection), and ``srv.latency_s`` for every request.

Observation: ``srv.requests`` (method, path, query, lower-cased headers, body) and
``srv.errors`` (tracebacks of handler crashes - assert it is empty).
"""

from __future__ import annotations

import copy
import re
import secrets
import ssl
import threading
import time
import traceback
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, parse_qsl, unquote, urlencode, urlsplit

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.fakes.notifications import (
    DEFAULT_TOPIC,
    EventSpec,
    make_notification_bundle,
    make_status_bundle,
    make_status_parameters,
)

__all__ = ["FailureRule", "FakeFhirServer", "KeyPair", "RecordedRequest", "make_keypair"]

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FHIR_JSON = "application/fhir+json"
_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_DATE_PREFIXES = ("eq", "ne", "gt", "ge", "lt", "le", "sa", "eb")
_IGNORED_PARAMS = frozenset({"_total", "_summary", "_elements", "_format", "_pretty", "_include", "_revinclude", "_contained"})
_KNOWN_PARAMS = frozenset({"_id", "patient", "subject", "code", "identifier", "status", "clinical-status", "category", "_lastUpdated", "date"})


# --- public helper types ----------------------------------------------------------------------
@dataclass(frozen=True)
class RecordedRequest:
    """One request as received. ``path`` excludes the query; ``headers`` names are lower-case."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    raw_query: str = ""

    def json(self) -> Any:
        return orjson.loads(self.body)

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


@dataclass
class FailureRule:
    """A scripted misbehaviour.

    :param status: status to answer with (``None``: only apply ``latency_s`` / drop, then serve
        normally).
    :param times: how many matching requests it applies to (``None``: forever).
    :param path: regex searched in the request path (no query), e.g. ``r"/fhir/Observation"``.
    :param method: only this HTTP method.
    :param retry_after: ``Retry-After`` header value (seconds or an HTTP-date string).
    :param latency_s: delay before answering (use with a client timeout to provoke timeouts).
    :param drop_connection: close the socket without any response.
    :param body: JSON body (default: an OperationOutcome).
    :param raw_body: exact body bytes instead (e.g. invalid JSON).
    """

    status: int | None = 503
    times: int | None = 1
    path: str | None = None
    method: str | None = None
    retry_after: str | float | int | None = None
    latency_s: float = 0.0
    drop_connection: bool = False
    body: Mapping[str, Any] | None = None
    raw_body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    hits: int = 0

    def matches(self, req: RecordedRequest) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and self.method.upper() != req.method:
            return False
        return self.path is None or re.search(self.path, req.path) is not None


@dataclass(frozen=True)
class KeyPair:
    """A signing key pair for SMART tests: ``private_pem`` for the client, ``public_pem`` for the server."""

    alg: Literal["RS384", "ES384"]
    private_pem: bytes
    public_pem: bytes
    kid: str

    def write_private(self, path: Any) -> Any:
        """Write the private PEM to ``path`` (a ``pathlib.Path``) and return it."""
        path.write_bytes(self.private_pem)
        return path


def make_keypair(alg: Literal["RS384", "ES384"] = "RS384", kid: str | None = None) -> KeyPair:
    """Generate an RSA-2048 (RS384) or EC P-384 (ES384) key pair."""
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if alg == "RS384" else ec.generate_private_key(ec.SECP384R1())
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return KeyPair(alg, private_pem, public_pem, kid or f"test-{alg.lower()}-{secrets.token_hex(4)}")


# --- internal state ---------------------------------------------------------------------------
_DROP = object()


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Stored:
    versions: list[dict[str, Any] | None] = field(default_factory=list)  # None = deletion tombstone
    deleted_at: dict[int, str] = field(default_factory=dict)  # version number of a tombstone -> its instant

    @property
    def current(self) -> dict[str, Any] | None:
        return self.versions[-1] if self.versions else None


@dataclass
class _Job:
    id: str
    request: str
    transaction_time: str
    files: dict[str, list[dict[str, Any]]]
    polls: int = 0


@dataclass
class _Event:
    number: int
    timestamp: str
    focus: str  # relative Type/id
    resource: dict[str, Any] | None
    additional_context: tuple[str, ...]
    interaction: Literal["create", "update", "delete"]


@dataclass
class _Subscription:
    id: str
    topic: str
    status: str
    content: Literal["empty", "id-only", "full-resource"]
    events: list[_Event] = field(default_factory=list)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64
    fake: FakeFhirServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (timeout, dropped connection) is normal; anything else is a bug."""
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            return
        self.fake.errors.append(traceback.format_exc())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 15  # idle keep-alive connections
    disable_nagle_algorithm = True  # headers and body go out in separate writes: avoid 40 ms delayed-ACK stalls
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr
        return None

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        body = self._read_body()
        split = urlsplit(self.path)
        req = RecordedRequest(
            method=self.command,
            path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            raw_query=split.query,
        )
        outcome = self.server.fake._handle(req)
        if outcome is _DROP:
            self.close_connection = True
            return
        assert isinstance(outcome, _Response)
        self.send_response(outcome.status)
        for name, value in outcome.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(outcome.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(outcome.body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _dispatch


# --- helpers ----------------------------------------------------------------------------------
def _instant(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_dt(value: str) -> tuple[datetime, datetime, bool] | None:
    """A FHIR date/dateTime/instant as (start, end, exact); partial dates span their period."""
    try:
        if re.fullmatch(r"\d{4}", value):
            lo = datetime(int(value), 1, 1, tzinfo=UTC)
            return lo, lo.replace(year=lo.year + 1), False
        if re.fullmatch(r"\d{4}-\d{2}", value):
            lo = datetime(int(value[:4]), int(value[5:7]), 1, tzinfo=UTC)
            hi = lo.replace(year=lo.year + 1, month=1) if lo.month == 12 else lo.replace(month=lo.month + 1)
            return lo, hi, False
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            lo = datetime.fromisoformat(value).replace(tzinfo=UTC)
            return lo, lo + timedelta(days=1), False
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    return dt, dt, True


def _split_unescaped(value: str, sep: str) -> list[str]:
    parts, buf, escaped = [], [], False
    for ch in value:
        if escaped:
            buf.append(ch)
            escaped = False
        elif ch == "\\":
            buf.append(ch)
            escaped = True
        elif ch == sep:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    parts.append("".join(buf))
    return parts


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)


def _tokens(value: str) -> list[tuple[str | None, str | None]]:
    """``a|b,c`` → [(a, b), (None, c)]; ``|c`` → ("", c) (no system); ``s|`` → (s, None)."""
    out: list[tuple[str | None, str | None]] = []
    for item in _split_unescaped(value, ","):
        pieces = _split_unescaped(item, "|")
        if len(pieces) == 1:
            out.append((None, _unescape(pieces[0])))
        else:
            system, code = _unescape(pieces[0]), _unescape("|".join(pieces[1:]))
            out.append((system, code or None))
    return out


def _codings(value: Any) -> list[dict[str, Any]]:
    concepts = value if isinstance(value, list) else [value]
    return [c for cc in concepts if isinstance(cc, dict) for c in (cc.get("coding") or []) if isinstance(c, dict)]


def _token_match(pairs: Iterable[tuple[Any, Any]], tokens: list[tuple[str | None, str | None]]) -> bool:
    for system, code in pairs:
        for want_system, want_code in tokens:
            if want_system is not None and want_system != "" and system != want_system:
                continue
            if want_system == "" and system:
                continue
            if want_code is not None and code != want_code:
                continue
            return True
    return False


def _ref_tail(reference: Any) -> str | None:
    if not isinstance(reference, dict) or not isinstance(reference.get("reference"), str):
        return None
    m = re.search(r"([A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$", reference["reference"])
    return m.group(1) if m else None


CLINICAL_DATE_FIELDS = (
    "effectiveDateTime",
    "effectiveInstant",
    ("effectivePeriod", "start"),
    "issued",
    "onsetDateTime",
    ("onsetPeriod", "start"),
    "recordedDate",
    "authoredOn",
    "performedDateTime",
    ("performedPeriod", "start"),
    "occurrenceDateTime",
    "dateAsserted",
    "date",
)


def clinical_date(resource: Mapping[str, Any]) -> str | None:
    """The first clinical date element present (what ``date`` search and ``_sort=date`` use)."""
    for f in CLINICAL_DATE_FIELDS:
        if isinstance(f, tuple):
            outer = resource.get(f[0])
            value = outer.get(f[1]) if isinstance(outer, dict) else None
        else:
            value = resource.get(f)
        if isinstance(value, str) and value:
            return value
    return None


def _date_match(actual: str | None, expr: str) -> bool:
    if actual is None:
        return False
    prefix = expr[:2] if expr[:2] in _DATE_PREFIXES else "eq"
    bound = _parse_dt(expr[2:] if expr[:2] in _DATE_PREFIXES else expr)
    got = _parse_dt(actual)
    if bound is None or got is None:
        return False
    lo, hi, exact = bound
    t = got[0]
    in_range = (t == lo) if exact else (lo <= t < hi)
    if prefix == "eq":
        return in_range
    if prefix == "ne":
        return not in_range
    if prefix in ("gt", "sa"):
        return t > lo if exact else t >= hi
    if prefix == "ge":
        return t >= lo
    if prefix in ("lt", "eb"):
        return t < lo
    return t <= lo if exact else t < hi  # le


def _content(resource: Mapping[str, Any] | None) -> Any:
    if resource is None:
        return None
    body = dict(resource)
    meta = dict(body.get("meta") or {})
    meta.pop("versionId", None)
    meta.pop("lastUpdated", None)
    if meta:
        body["meta"] = meta
    else:
        body.pop("meta", None)
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def _oo(severity: str, code: str, diagnostics: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


def _public_key(key: Any) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    if isinstance(key, KeyPair):
        key = key.public_pem
    if isinstance(key, str):
        key = key.encode("ascii")
    if isinstance(key, bytes):
        private = b"PRIVATE KEY" in key
        key = serialization.load_pem_private_key(key, password=None) if private else serialization.load_pem_public_key(key)
    if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        key = key.public_key()
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise TypeError("unsupported key")
    return key


# --- the server -------------------------------------------------------------------------------
class FakeFhirServer:
    """In-memory FHIR R4 server on a real socket. See the module docstring for the full tour.

    :param required_token: a static bearer token every protected endpoint requires.
    :param require_auth: require a bearer token (static or issued) even without ``required_token``.
    :param smart_clients: ``{client_id: KeyPair | public PEM | key}`` allowed at the token endpoint.
    :param token_lifetime_s: ``expires_in`` of issued tokens.
    :param default_page_size: search page size without ``_count``.
    :param next_link_base: base URL written into ``next`` links (to test origin checks).
    :param bulk_polls_before_ready: status polls answered 202 before the manifest.
    :param bulk_retry_after: ``Retry-After`` value on those 202s.
    :param bulk_file_base: where bulk file URLs point (default: this server's origin).
    :param latency_s: delay added to every request.
    :param strict_search: unknown search parameters → 400.
    :param write_return: force ``"minimal"`` (empty body + Location) or ``"representation"``
        write responses whatever the client's ``Prefer`` (servers differ).
    :param tls: a server-side TLS context: serve HTTPS (``origin`` is then ``https://…``).
    """

    def __init__(
        self,
        *,
        required_token: str | None = None,
        require_auth: bool = False,
        smart_clients: Mapping[str, Any] | None = None,
        token_lifetime_s: int = 300,
        default_page_size: int = 50,
        max_page_size: int = 1000,
        next_link_base: str | None = None,
        bulk_polls_before_ready: int = 1,
        bulk_retry_after: str | float | int = 1,
        bulk_file_base: str | None = None,
        latency_s: float = 0.0,
        strict_search: bool = False,
        smart_configuration: Mapping[str, Any] | None = None,
        write_return: Literal["minimal", "representation"] | None = None,
        host: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.tls = tls
        self.required_token = required_token
        self.require_auth = require_auth or required_token is not None
        self.token_lifetime_s = token_lifetime_s
        self.default_page_size = default_page_size
        self.max_page_size = max_page_size
        self.next_link_base = next_link_base
        self.bulk_polls_before_ready = bulk_polls_before_ready
        self.bulk_retry_after = bulk_retry_after
        self.bulk_file_base = bulk_file_base
        self.latency_s = latency_s
        self.strict_search = strict_search
        #: How a deletion is written in a history Bundle: "spec" (``request.url`` Type/id, ``response.lastModified``)
        #: or "hapi" (``request.url`` Type/id/_history/n and an etag, no ``lastModified``).
        self.history_deletion_form: Literal["spec", "hapi"] = "spec"
        self.smart_configuration_overrides = dict(smart_configuration or {})
        self.write_return = write_return
        self._host = host
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._store: dict[tuple[str, str], _Stored] = {}
        self._last_instant = datetime.now(UTC) - timedelta(seconds=1)
        self._rules: list[FailureRule] = []
        self._requests: list[RecordedRequest] = []
        self._issued: dict[str, float] = {}
        self._jtis: set[str] = set()
        self._clients: dict[str, list[tuple[str | None, Any]]] = {}
        self._jobs: dict[str, _Job] = {}
        self._subs: dict[str, _Subscription] = {}
        self.errors: list[str] = []
        self.token_errors: list[str] = []
        for client_id, key in (smart_clients or {}).items():
            self.register_smart_client(client_id, key)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> FakeFhirServer:
        if self._httpd is not None:
            return self
        httpd = _HTTPServer((self._host, 0), _Handler)
        httpd.fake = self
        if self.tls is not None:
            # The handshake happens on accept; a client that refuses the certificate just ends its connection.
            httpd.socket = self.tls.wrap_socket(httpd.socket, server_side=True)
        self._httpd = httpd
        self._stop.clear()
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeFhirServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("FakeFhirServer is not started")
        return int(self._httpd.server_address[1])

    @property
    def origin(self) -> str:
        return f"{'https' if self.tls is not None else 'http'}://{self._host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.origin}/fhir"

    @property
    def token_url(self) -> str:
        return f"{self.origin}/auth/token"

    # --- data ---------------------------------------------------------------------------------
    def _next_instant(self, requested: datetime | str | None = None) -> str:
        if isinstance(requested, str):
            parsed = _parse_dt(requested)
            if parsed is None:
                raise ValueError("last_updated is not a FHIR instant")
            return _instant(parsed[0])
        if requested is not None:
            return _instant(requested if requested.tzinfo else requested.replace(tzinfo=UTC))
        now = datetime.now(UTC)
        now = now.replace(microsecond=(now.microsecond // 1000) * 1000)
        if now <= self._last_instant:
            now = self._last_instant + timedelta(milliseconds=1)
        self._last_instant = now
        return _instant(now)

    def _write(self, resource: Mapping[str, Any], *, noop_if_unchanged: bool, last_updated: datetime | str | None = None) -> tuple[dict[str, Any], int]:
        rtype, rid = resource["resourceType"], resource["id"]
        stored = self._store.setdefault((rtype, rid), _Stored())
        current = stored.current
        if current is not None and noop_if_unchanged and _content(current) == _content(resource):
            return copy.deepcopy(current), 200
        version = len(stored.versions) + 1
        new = copy.deepcopy(dict(resource))
        meta = dict(new.get("meta") or {})
        meta["versionId"] = str(version)
        meta["lastUpdated"] = self._next_instant(last_updated)
        new["meta"] = meta
        stored.versions.append(new)
        return copy.deepcopy(new), (201 if current is None else 200)

    def put(self, resource: Mapping[str, Any], *, last_updated: datetime | str | None = None) -> dict[str, Any]:
        """Store a resource (id assigned if absent), always creating a new version; returns it."""
        if not _TYPE.match(str(resource.get("resourceType", ""))):
            raise ValueError("resource needs a resourceType")
        body = dict(resource)
        body.setdefault("id", str(uuid.uuid4()))
        if not _ID.match(str(body["id"])):
            raise ValueError("invalid id")
        with self._lock:
            return self._write(body, noop_if_unchanged=False, last_updated=last_updated)[0]

    def put_all(self, resources: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return [self.put(r) for r in resources]

    def get(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """The current version (``None`` if unknown or deleted)."""
        with self._lock:
            stored = self._store.get((resource_type, resource_id))
            return copy.deepcopy(stored.current) if stored and stored.current else None

    def versions(self, resource_type: str, resource_id: str) -> list[dict[str, Any] | None]:
        with self._lock:
            stored = self._store.get((resource_type, resource_id))
            return copy.deepcopy(stored.versions) if stored else []

    def delete(self, resource_type: str, resource_id: str) -> bool:
        """Delete (a tombstone version; reads then give 410). Returns whether it existed."""
        with self._lock:
            stored = self._store.get((resource_type, resource_id))
            if stored is None or stored.current is None:
                return False
            stored.versions.append(None)
            stored.deleted_at[len(stored.versions)] = self._next_instant()
            return True

    def resources(self, resource_type: str | None = None) -> list[dict[str, Any]]:
        """Current versions, in insertion order."""
        with self._lock:
            return [copy.deepcopy(s.current) for (t, _), s in self._store.items() if s.current is not None and (resource_type is None or t == resource_type)]

    def clear(self) -> None:
        """Forget resources, jobs, subscriptions, rules and the request log."""
        with self._lock:
            self._store.clear()
            self._jobs.clear()
            self._subs.clear()
            self._rules.clear()
            self._requests.clear()

    # --- observation --------------------------------------------------------------------------
    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def requests_matching(self, path: str | None = None, method: str | None = None) -> list[RecordedRequest]:
        """Logged requests whose path matches the regex ``path`` (searched) and ``method``."""
        return [r for r in self.requests if (path is None or re.search(path, r.path)) and (method is None or r.method == method.upper())]

    def count(self, path: str | None = None, method: str | None = None) -> int:
        return len(self.requests_matching(path, method))

    # --- failure injection --------------------------------------------------------------------
    def add_rule(self, rule: FailureRule) -> FailureRule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def fail_next(
        self,
        n: int = 1,
        status: int = 503,
        retry_after: str | float | int | None = None,
        *,
        path: str | None = None,
        method: str | None = None,
    ) -> FailureRule:
        """The next ``n`` matching requests get ``status`` (with ``Retry-After`` if given)."""
        return self.add_rule(FailureRule(status=status, times=n, path=path, method=method, retry_after=retry_after))

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    # --- SMART --------------------------------------------------------------------------------
    def register_smart_client(self, client_id: str, key: Any, kid: str | None = None) -> None:
        """Allow ``client_id`` to authenticate with ``key`` (KeyPair, PEM or key object).
        With a KeyPair, its ``kid`` is required in the assertion header unless ``kid`` overrides."""
        if kid is None and isinstance(key, KeyPair):
            kid = key.kid
        with self._lock:
            self._clients.setdefault(client_id, []).append((kid, _public_key(key)))

    def issue_token(self, lifetime_s: float | None = None) -> str:
        """A token the server accepts (bypassing the token endpoint)."""
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._issued[token] = time.time() + (lifetime_s if lifetime_s is not None else self.token_lifetime_s)
        return token

    def revoke_tokens(self) -> None:
        """Invalidate every issued token (the client should then get 401 and refresh)."""
        with self._lock:
            self._issued.clear()

    # --- Backport subscriptions ----------------------------------------------------------------
    def add_subscription(
        self,
        subscription_id: str,
        *,
        topic: str = DEFAULT_TOPIC,
        status: str = "active",
        content: Literal["empty", "id-only", "full-resource"] = "id-only",
    ) -> None:
        with self._lock:
            self._subs[subscription_id] = _Subscription(subscription_id, topic, status, content)

    def record_event(
        self,
        subscription_id: str,
        focus: Mapping[str, Any] | str,
        *,
        timestamp: str | None = None,
        additional_context: Sequence[str] = (),
        interaction: Literal["create", "update", "delete"] = "update",
    ) -> int:
        """Append a notification event (focus: a resource snapshot or ``"Type/id"``); returns its
        event number (1, 2, … per subscription). Unknown subscriptions are created."""
        with self._lock:
            sub = self._subs.get(subscription_id)
            if sub is None:
                self.add_subscription(subscription_id)
                sub = self._subs[subscription_id]
            if isinstance(focus, str):
                ref, snapshot = focus, None
            else:
                ref, snapshot = f"{focus['resourceType']}/{focus['id']}", copy.deepcopy(dict(focus))
            number = len(sub.events) + 1
            sub.events.append(_Event(number, timestamp or self._next_instant(), ref, snapshot, tuple(additional_context), interaction))
            return number

    def notification_bundle(
        self,
        subscription_id: str,
        event_numbers: Sequence[int] | None = None,
        *,
        type: Literal["event-notification", "query-event"] = "event-notification",
        content: Literal["empty", "id-only", "full-resource"] | None = None,
    ) -> dict[str, Any]:
        """The Bundle this server would push for the given stored events (default: all)."""
        with self._lock:
            sub = self._subs[subscription_id]
            wanted = set(event_numbers) if event_numbers is not None else None
            events = [e for e in sub.events if wanted is None or e.number in wanted]
            return self._events_bundle(sub, events, type=type, content=content or sub.content)

    def _events_bundle(self, sub: _Subscription, events: list[_Event], *, type: Any, content: Literal["empty", "id-only", "full-resource"]) -> dict[str, Any]:
        specs = []
        for e in events:
            focus: Mapping[str, Any] | str = e.focus
            if content == "full-resource":
                resource = e.resource or self.get(*e.focus.split("/", 1))
                focus = resource if resource is not None else e.focus
            specs.append(EventSpec(e.number, focus, e.timestamp, e.additional_context, e.interaction))
        return make_notification_bundle(
            subscription=f"{self.base_url}/Subscription/{sub.id}",
            type=type,
            status=sub.status,
            topic=sub.topic,
            events=specs,
            events_since_start=len(sub.events),
            content=content,
            base_url=self.base_url,
        )

    # --- request handling ---------------------------------------------------------------------
    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stop.wait(seconds)

    def _handle(self, req: RecordedRequest) -> _Response | object:
        with self._lock:
            self._requests.append(req)
            rule = next((r for r in self._rules if r.matches(req)), None)
            if rule is not None:
                rule.hits += 1
        self._sleep(self.latency_s)
        if rule is not None:
            self._sleep(rule.latency_s)
            if rule.drop_connection:
                return _DROP
            if rule.status is not None:
                headers = {"Content-Type": FHIR_JSON, **dict(rule.headers)}
                if rule.retry_after is not None:
                    headers["Retry-After"] = str(rule.retry_after)
                if rule.raw_body is not None:
                    return _Response(rule.status, rule.raw_body, headers)
                body = rule.body if rule.body is not None else _oo("error", "transient", f"injected {rule.status}")
                return _Response(rule.status, orjson.dumps(body), headers)
        try:
            with self._lock:
                return self._route(req)
        except Exception:
            self.errors.append(traceback.format_exc())
            return self._json(500, _oo("fatal", "exception", "fake server error (see srv.errors)"))

    def _json(self, status: int, body: Any, headers: Mapping[str, str] | None = None, content_type: str = FHIR_JSON) -> _Response:
        return _Response(status, orjson.dumps(body), {"Content-Type": content_type, **dict(headers or {})})

    def _error(self, status: int, code: str, message: str) -> _Response:
        return self._json(status, _oo("error", code, message))

    def _authorized(self, req: RecordedRequest) -> bool:
        if not self.require_auth:
            return True
        scheme, _, token = req.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        if self.required_token is not None and secrets.compare_digest(token, self.required_token):
            return True
        expiry = self._issued.get(token)
        return expiry is not None and expiry > time.time()

    def _route(self, req: RecordedRequest) -> _Response:
        path = req.path
        if path == "/auth/token":
            return self._token(req) if req.method == "POST" else self._error(405, "not-supported", "POST only")
        if path.startswith("/bulk/"):
            if not self._authorized(req):
                return self._unauthorized()
            return self._bulk_endpoint(req, path.removeprefix("/bulk/").split("/"))
        if path != "/fhir" and not path.startswith("/fhir/"):
            return self._error(404, "not-found", "unknown path")
        rel = path.removeprefix("/fhir").strip("/")
        segs = [unquote(s) for s in rel.split("/")] if rel else []
        if segs == ["metadata"]:
            return self._json(200, self._capability_statement())
        if segs == [".well-known", "smart-configuration"]:
            return self._json(200, self._smart_configuration(), content_type="application/json")
        if not self._authorized(req):
            return self._unauthorized()
        if not segs:
            return self._error(501, "not-supported", "batch/transaction not supported by the fake")
        if segs == ["$export"]:
            return self._bulk_kickoff(req, "system", None)
        rtype = segs[0]
        if not _TYPE.match(rtype):
            return self._error(404, "not-found", "unknown resource type")
        if len(segs) == 1:
            if req.method == "GET":
                return self._search_response(req, rtype, self._query_pairs(req))
            if req.method == "POST":
                return self._create(req, rtype)
            if req.method == "PUT":
                return self._conditional_update(req, rtype)
            return self._error(405, "not-supported", "method not allowed")
        second = segs[1]
        if len(segs) == 2 and second == "_search" and req.method == "POST":
            form = parse_qsl(req.body.decode("utf-8"), keep_blank_values=True) if req.body else []
            return self._search_response(req, rtype, self._query_pairs(req) + form)
        if len(segs) == 2 and second == "$export" and rtype == "Patient":
            return self._bulk_kickoff(req, "patient", None)
        if len(segs) == 2 and second == "$status" and rtype == "Subscription":
            return self._subscription_status(req, None)
        if len(segs) == 2 and second == "_history" and req.method == "GET":
            return self._type_history(req, rtype)
        if not _ID.match(second):
            return self._error(404, "not-found", "invalid id or unknown operation")
        if len(segs) == 2:
            if req.method in ("GET", "HEAD"):
                return self._read(rtype, second, None)
            if req.method == "PUT":
                return self._update(req, rtype, second)
            if req.method == "DELETE":
                existed = self.delete(rtype, second)
                return self._json(200 if existed else 204, _oo("information", "informational", "deleted"))
            return self._error(405, "not-supported", "method not allowed")
        third = segs[2]
        if len(segs) == 3 and third == "_history" and req.method == "GET":
            return self._history(rtype, second)
        if len(segs) == 4 and third == "_history" and req.method == "GET":
            return self._read(rtype, second, segs[3])
        if len(segs) == 3 and third == "$export" and rtype == "Group":
            return self._bulk_kickoff(req, "group", second)
        if len(segs) == 3 and rtype == "Subscription" and third == "$events":
            return self._subscription_events(req, second)
        if len(segs) == 3 and rtype == "Subscription" and third == "$status":
            return self._subscription_status(req, second)
        return self._error(404, "not-supported", "unknown operation")

    def _unauthorized(self) -> _Response:
        return self._json(401, _oo("error", "login", "bearer token required"), {"WWW-Authenticate": 'Bearer realm="fake-fhir"'})

    @staticmethod
    def _query_pairs(req: RecordedRequest) -> list[tuple[str, str]]:
        return parse_qsl(req.raw_query, keep_blank_values=True)

    # --- metadata -----------------------------------------------------------------------------
    def _capability_statement(self) -> dict[str, Any]:
        types = sorted({t for (t, _), s in self._store.items() if s.current is not None})
        return {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": "2024-01-01",
            "kind": "instance",
            "fhirVersion": "4.0.1",
            "format": ["json"],
            "rest": [
                {
                    "mode": "server",
                    "security": {
                        "extension": [
                            {
                                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                                "extension": [{"url": "token", "valueUri": self.token_url}],
                            }
                        ]
                    },
                    "resource": [{"type": t, "interaction": [{"code": "read"}, {"code": "search-type"}]} for t in types],
                }
            ],
        }

    def _smart_configuration(self) -> dict[str, Any]:
        return {
            "issuer": self.origin,
            "token_endpoint": self.token_url,
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            "grant_types_supported": ["client_credentials"],
            "scopes_supported": ["system/*.rs", "system/*.cud"],
            "capabilities": ["client-confidential-asymmetric", "permission-v2"],
            **self.smart_configuration_overrides,
        }

    # --- token endpoint -----------------------------------------------------------------------
    def _token_error(self, status: int, error: str, why: str) -> _Response:
        self.token_errors.append(why)
        return self._json(status, {"error": error, "error_description": why}, content_type="application/json")

    def _token(self, req: RecordedRequest) -> _Response:
        form = parse_qs(req.body.decode("utf-8"), keep_blank_values=True)

        def one(name: str) -> str | None:
            values = form.get(name)
            return values[0] if values and len(values) == 1 else None

        if one("grant_type") != "client_credentials":
            return self._token_error(400, "unsupported_grant_type", "grant_type must be client_credentials")
        if one("client_assertion_type") != JWT_BEARER:
            return self._token_error(400, "invalid_request", "client_assertion_type must be jwt-bearer")
        assertion = one("client_assertion")
        if not assertion:
            return self._token_error(400, "invalid_request", "client_assertion missing")
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            return self._token_error(400, "invalid_client", "assertion is not a JWT")
        alg, kid, iss = header.get("alg"), header.get("kid"), unverified.get("iss")
        if alg not in ("RS384", "ES384"):
            return self._token_error(400, "invalid_client", "alg must be RS384 or ES384")
        if not kid:
            return self._token_error(400, "invalid_client", "kid header missing")
        if header.get("typ") not in (None, "JWT"):
            return self._token_error(400, "invalid_client", "typ must be JWT")
        keys = self._clients.get(iss) if isinstance(iss, str) else None
        if not keys:
            return self._token_error(401, "invalid_client", "unknown client")
        candidates = [k for key_id, k in keys if key_id is None or key_id == kid]
        expected_type = rsa.RSAPublicKey if alg == "RS384" else ec.EllipticCurvePublicKey
        candidates = [k for k in candidates if isinstance(k, expected_type)]
        if not candidates:
            return self._token_error(401, "invalid_client", "no registered key for kid/alg")
        claims = None
        for key in candidates:
            try:
                claims = jwt.decode(
                    assertion,
                    key,
                    algorithms=[alg],
                    audience=self.token_url,
                    options={"require": ["iss", "sub", "aud", "exp", "jti"]},
                    leeway=5,
                )
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as exc:
                return self._token_error(401, "invalid_client", f"assertion rejected: {type(exc).__name__}")
        if claims is None:
            return self._token_error(401, "invalid_client", "bad signature")
        if claims["sub"] != claims["iss"]:
            return self._token_error(401, "invalid_client", "sub must equal iss")
        if claims["exp"] - time.time() > 300 + 5:
            return self._token_error(401, "invalid_client", "exp more than 5 minutes ahead")
        if claims["jti"] in self._jtis:
            return self._token_error(401, "invalid_client", "jti replayed")
        self._jtis.add(claims["jti"])
        token = secrets.token_urlsafe(24)
        self._issued[token] = time.time() + self.token_lifetime_s
        body = {"access_token": token, "token_type": "bearer", "expires_in": self.token_lifetime_s, "scope": one("scope") or ""}
        return self._json(200, body, {"Cache-Control": "no-store", "Pragma": "no-cache"}, content_type="application/json")

    # --- read / history -----------------------------------------------------------------------
    def _resource_headers(self, resource: Mapping[str, Any]) -> dict[str, str]:
        meta = resource.get("meta") or {}
        headers = {"ETag": f'W/"{meta.get("versionId")}"'}
        parsed = _parse_dt(str(meta.get("lastUpdated", "")))
        if parsed:
            headers["Last-Modified"] = format_datetime(parsed[0], usegmt=True)
        return headers

    def _read(self, rtype: str, rid: str, version: str | None) -> _Response:
        stored = self._store.get((rtype, rid))
        if stored is None:
            return self._error(404, "not-found", "resource not found")
        if version is None:
            resource = stored.current
        else:
            if not version.isdigit() or not 1 <= int(version) <= len(stored.versions):
                return self._error(404, "not-found", "version not found")
            resource = stored.versions[int(version) - 1]
        if resource is None:
            return self._error(410, "deleted", "resource deleted")
        return self._json(200, resource, self._resource_headers(resource))

    def _history_entries(self, rtype: str, rid: str, stored: _Stored) -> list[tuple[str, dict[str, Any]]]:
        """(instant, entry) of every version of a resource, newest first."""
        entries = []
        for number, version in reversed(list(enumerate(stored.versions, start=1))):
            entry: dict[str, Any] = {"fullUrl": f"{self.base_url}/{rtype}/{rid}"}
            if version is None:
                when = stored.deleted_at.get(number, "")
                # The deletion is a version of its own (as HAPI).
                if self.history_deletion_form == "hapi":
                    entry["request"] = {"method": "DELETE", "url": f"{rtype}/{rid}/_history/{number}"}
                    entry["response"] = {"status": "200 OK", "etag": f'W/"{number}"'}
                else:
                    entry["request"] = {"method": "DELETE", "url": f"{rtype}/{rid}"}
                    entry["response"] = {"status": "204", "etag": f'W/"{number}"', **({"lastModified": when} if when else {})}
            else:
                when = version["meta"]["lastUpdated"]
                entry["resource"] = copy.deepcopy(version)
                entry["request"] = {"method": "POST" if number == 1 else "PUT", "url": rtype if number == 1 else f"{rtype}/{rid}"}
                entry["response"] = {"status": "201" if number == 1 else "200", "etag": f'W/"{number}"', "lastModified": when}
            entries.append((when, entry))
        return entries

    def _history(self, rtype: str, rid: str) -> _Response:
        stored = self._store.get((rtype, rid))
        if stored is None:
            return self._error(404, "not-found", "resource not found")
        entries = [entry for _, entry in self._history_entries(rtype, rid, stored)]
        return self._json(200, {"resourceType": "Bundle", "type": "history", "total": len(entries), "entry": entries})

    def _type_history(self, req: RecordedRequest, rtype: str) -> _Response:
        """``GET [base]/[type]/_history``: ``_since`` (versions and deletions at or after it), ``_count``, ``_offset``;
        newest first, with ``next`` links."""
        count, offset, since = self.default_page_size, 0, None
        for name, value in self._query_pairs(req):
            if name in ("_count", "_offset"):
                if not value.isdigit():
                    return self._error(400, "invalid", f"{name} must be a non-negative integer")
                if name == "_count":
                    count = min(int(value), self.max_page_size)
                else:
                    offset = int(value)
            elif name == "_since":
                parsed = _parse_dt(value)
                if parsed is None:
                    return self._error(400, "invalid", "invalid _since")
                since = parsed[0]
            else:
                return self._error(400, "not-supported", "unknown history parameter")
        found = []
        for (t, rid), stored in self._store.items():
            if t != rtype:
                continue
            for when, entry in self._history_entries(rtype, rid, stored):
                parsed_when = _parse_dt(when) if when else None
                if since is None or (parsed_when is not None and parsed_when[0] >= since):  # _since is inclusive
                    found.append((parsed_when[0] if parsed_when else datetime.min.replace(tzinfo=UTC), entry))
        found.sort(key=lambda pair: pair[0], reverse=True)
        page = [entry for _, entry in found[offset : offset + count]]
        kept = [("_since", _instant(since))] if since is not None else []
        links = [{"relation": "self", "url": f"{self.base_url}/{rtype}/_history?{urlencode([*kept, ('_count', count), ('_offset', offset)])}"}]
        if count > 0 and offset + count < len(found):
            links.append({"relation": "next", "url": f"{self.base_url}/{rtype}/_history?{urlencode([*kept, ('_count', count), ('_offset', offset + count)])}"})
        bundle = {"resourceType": "Bundle", "type": "history", "total": len(found), "link": links, "entry": page}
        return self._json(200, bundle)

    # --- search -------------------------------------------------------------------------------
    def _matches(self, resource: Mapping[str, Any], name: str, value: str) -> bool:
        base = name.split(":", 1)[0]
        if base == "_id":
            return resource.get("id") in [_unescape(v) for v in _split_unescaped(value, ",")]
        if base == "_lastUpdated":
            return _date_match((resource.get("meta") or {}).get("lastUpdated"), value)
        if base == "date":
            return _date_match(clinical_date(resource), value)
        if base in ("patient", "subject"):
            wanted = set()
            for v in _split_unescaped(value, ","):
                v = _unescape(v)
                tail = _ref_tail({"reference": v}) if "/" in v else None
                wanted.add(tail or (f"Patient/{v}" if base == "patient" else v))
            refs = {_ref_tail(resource.get("subject")), _ref_tail(resource.get("patient"))}
            if base == "subject":  # a bare id matches any subject type
                refs |= {r.split("/", 1)[1] for r in refs if r}
            return bool(wanted & {r for r in refs if r})
        if base == "code":
            field_values = [resource.get(f) for f in ("code", "medicationCodeableConcept", "vaccineCode")]
            pairs = [(c.get("system"), c.get("code")) for fv in field_values if fv for c in _codings(fv)]
            return _token_match(pairs, _tokens(value))
        if base == "identifier":
            idents = resource.get("identifier") or []
            pairs = [(i.get("system"), i.get("value")) for i in idents if isinstance(i, dict)]
            return _token_match(pairs, _tokens(value))
        if base == "status":
            return resource.get("status") in [_unescape(v) for v in _split_unescaped(value, ",")]
        if base == "clinical-status":
            pairs = [(c.get("system"), c.get("code")) for c in _codings(resource.get("clinicalStatus"))]
            return _token_match(pairs, _tokens(value))
        if base == "category":
            pairs = [(c.get("system"), c.get("code")) for c in _codings(resource.get("category") or [])]
            return _token_match(pairs, _tokens(value))
        return True

    def search(self, resource_type: str, params: Sequence[tuple[str, str]] | Mapping[str, str] = ()) -> list[dict[str, Any]]:
        """Run a search in-process (all matches, no paging) - handy for asserting test fixtures."""
        pairs = list(params.items()) if isinstance(params, Mapping) else list(params)
        with self._lock:
            return copy.deepcopy(self._find(resource_type, pairs)[0])

    def _find(self, rtype: str, pairs: list[tuple[str, str]]) -> tuple[list[dict[str, Any]], list[str]]:
        filters = [(n, v) for n, v in pairs if not n.startswith("_") or n in ("_id", "_lastUpdated")]
        sorts: list[str] = []
        for name, value in pairs:
            if name == "_sort":
                sorts = [s.strip() for s in value.split(",") if s.strip()]
        items = [
            s.current for (t, _), s in self._store.items() if t == rtype and s.current is not None and all(self._matches(s.current, n, v) for n, v in filters)
        ]
        getters = {
            "date": clinical_date,
            "_lastUpdated": lambda r: (r.get("meta") or {}).get("lastUpdated"),
            "_id": lambda r: r.get("id"),
        }
        for key in reversed(sorts):
            desc, name = key.startswith("-"), key.lstrip("-")
            getter = getters.get(name)
            if getter is None:
                continue
            present = [r for r in items if getter(r) is not None]
            absent = [r for r in items if getter(r) is None]
            if name in ("date", "_lastUpdated"):
                present.sort(key=lambda r, g=getter: _parse_dt(g(r)) or (datetime.min.replace(tzinfo=UTC),), reverse=desc)  # type: ignore[misc]
            else:
                present.sort(key=getter, reverse=desc)  # type: ignore[arg-type]
            items = present + absent
        return items, sorts  # type: ignore[return-value]

    def _search_response(self, req: RecordedRequest, rtype: str, pairs: list[tuple[str, str]]) -> _Response:
        count, offset = self.default_page_size, 0
        kept: list[tuple[str, str]] = []
        for name, value in pairs:
            if name == "_count":
                if not value.isdigit():
                    return self._error(400, "invalid", "_count must be a non-negative integer")
                count = min(int(value), self.max_page_size)
                continue
            if name == "_offset":
                if not value.isdigit():
                    return self._error(400, "invalid", "_offset must be a non-negative integer")
                offset = int(value)
                continue
            base = name.split(":", 1)[0]
            if base in _IGNORED_PARAMS:
                continue
            if self.strict_search and base not in _KNOWN_PARAMS and base != "_sort":
                return self._error(400, "not-supported", "unknown search parameter")
            if base in ("_lastUpdated", "date") and _parse_dt(value[2:] if value[:2] in _DATE_PREFIXES else value) is None:
                return self._error(400, "invalid", "invalid date")
            kept.append((name, value))
        matches, _ = self._find(rtype, kept)
        page = matches[offset : offset + count]
        link_base = (self.next_link_base or self.base_url).rstrip("/")
        links = [
            {
                "relation": "self",
                "url": f"{link_base}/{rtype}?{urlencode([*kept, ('_count', str(count)), ('_offset', str(offset))])}",
            }
        ]
        if count > 0 and offset + count < len(matches):
            next_q = urlencode([*kept, ("_count", str(count)), ("_offset", str(offset + count))])
            links.append({"relation": "next", "url": f"{link_base}/{rtype}?{next_q}"})
        bundle = {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "meta": {"lastUpdated": _instant(datetime.now(UTC))},
            "type": "searchset",
            "total": len(matches),
            "link": links,
            "entry": [{"fullUrl": f"{self.base_url}/{rtype}/{r['id']}", "resource": copy.deepcopy(r), "search": {"mode": "match"}} for r in page],
        }
        return self._json(200, bundle)

    # --- writes -------------------------------------------------------------------------------
    def _body_resource(self, req: RecordedRequest, rtype: str) -> dict[str, Any] | _Response:
        try:
            body = orjson.loads(req.body)
        except orjson.JSONDecodeError:
            return self._error(400, "structure", "body is not JSON")
        if not isinstance(body, dict) or body.get("resourceType") != rtype:
            return self._error(400, "invalid", "body resourceType does not match the URL")
        if "id" in body and (not isinstance(body["id"], str) or not _ID.match(body["id"])):
            return self._error(400, "invalid", "invalid id")
        return body

    def _write_response(self, req: RecordedRequest, resource: dict[str, Any], status: int) -> _Response:
        version = resource["meta"]["versionId"]
        location = f"{self.base_url}/{resource['resourceType']}/{resource['id']}/_history/{version}"
        headers = {**self._resource_headers(resource), "Location": location, "Content-Location": location}
        prefer = f"return={self.write_return}" if self.write_return else req.headers.get("prefer", "")
        if "return=minimal" in prefer:
            return _Response(status, b"", headers)
        if "return=OperationOutcome" in prefer:
            return self._json(status, _oo("information", "informational", "ok"), headers)
        return self._json(status, resource, headers)

    def _if_match_failed(self, req: RecordedRequest, current: Mapping[str, Any] | None) -> bool:
        wanted = req.headers.get("if-match")
        if wanted is None:
            return False
        m = re.fullmatch(r'\s*(?:W/)?"([^"]+)"\s*', wanted)
        return current is None or m is None or m.group(1) != current["meta"]["versionId"]

    def _create(self, req: RecordedRequest, rtype: str) -> _Response:
        body = self._body_resource(req, rtype)
        if isinstance(body, _Response):
            return body
        condition = req.headers.get("if-none-exist")
        if condition:
            found, _ = self._find(rtype, parse_qsl(condition.lstrip("?"), keep_blank_values=True))
            if len(found) > 1:
                return self._error(412, "duplicate", "If-None-Exist matched several resources")
            if found:
                return self._write_response(req, copy.deepcopy(found[0]), 200)
        body["id"] = str(uuid.uuid4())  # the server assigns ids on create
        stored, _ = self._write(body, noop_if_unchanged=False)
        return self._write_response(req, stored, 201)

    def _update(self, req: RecordedRequest, rtype: str, rid: str) -> _Response:
        body = self._body_resource(req, rtype)
        if isinstance(body, _Response):
            return body
        if body.get("id") != rid:
            return self._error(400, "invalid", "resource id must match the URL id")
        existing = self._store.get((rtype, rid))
        if self._if_match_failed(req, existing.current if existing else None):
            return self._error(412, "conflict", "version mismatch (If-Match)")
        stored, status = self._write(body, noop_if_unchanged=True)
        return self._write_response(req, stored, status)

    def _conditional_update(self, req: RecordedRequest, rtype: str) -> _Response:
        criteria = self._query_pairs(req)
        if not criteria:
            return self._error(400, "invalid", "conditional update needs search criteria")
        body = self._body_resource(req, rtype)
        if isinstance(body, _Response):
            return body
        found, _ = self._find(rtype, criteria)
        if len(found) > 1:
            return self._error(412, "multiple-matches", "conditional update matched several resources")
        if found:
            target = found[0]["id"]
            if body.get("id") not in (None, target):
                return self._error(400, "invalid", "resource id does not match the conditional match")
            body["id"] = target
        else:
            body.setdefault("id", str(uuid.uuid4()))
        stored, status = self._write(body, noop_if_unchanged=True)
        return self._write_response(req, stored, status)

    # --- bulk data ----------------------------------------------------------------------------
    def _bulk_params(self, req: RecordedRequest) -> dict[str, list[str]]:
        params: dict[str, list[str]] = {k: list(v) for k, v in req.query.items()}
        if req.method == "POST" and req.body:
            body = orjson.loads(req.body)
            for p in body.get("parameter", []) if isinstance(body, dict) else []:
                value = next((v for k, v in p.items() if k.startswith("value")), None)
                if isinstance(p.get("name"), str) and value is not None:
                    params.setdefault(p["name"], []).append(str(value))
        return params

    def _bulk_kickoff(self, req: RecordedRequest, level: str, group_id: str | None) -> _Response:
        if req.method not in ("GET", "POST"):
            return self._error(405, "not-supported", "GET or POST")
        if "respond-async" not in req.headers.get("prefer", ""):
            return self._error(400, "invalid", "Prefer: respond-async is required")
        accept = req.headers.get("accept", FHIR_JSON)
        if not any(a in accept for a in (FHIR_JSON, "application/json", "*/*")):
            return self._error(400, "invalid", "Accept must be application/fhir+json")
        params = self._bulk_params(req)
        fmt = (params.get("_outputFormat") or [None])[0]
        if fmt not in (None, "application/fhir+ndjson", "application/ndjson", "ndjson"):
            return self._error(400, "not-supported", "unsupported _outputFormat")
        types = {t for v in params.get("_type", []) for t in v.split(",") if t}
        since_raw = (params.get("_since") or [None])[0]
        since = _parse_dt(since_raw)[0] if since_raw and _parse_dt(since_raw) else None
        if since_raw and since is None:
            return self._error(400, "invalid", "invalid _since")
        members: set[str] | None = None
        if level == "group":
            group = self._store.get(("Group", group_id or ""))
            if group is None or group.current is None:
                return self._error(404, "not-found", "group not found")
            members = {t for m in group.current.get("member", []) if (t := _ref_tail(m.get("entity")))}
        files: dict[str, list[dict[str, Any]]] = {}
        for (rtype, rid), stored in self._store.items():
            resource = stored.current
            if resource is None or (types and rtype not in types):
                continue
            if since is not None:
                updated = _parse_dt(resource["meta"]["lastUpdated"])
                if updated is None or updated[0] <= since:
                    continue
            if level != "system":
                patient_ref = f"Patient/{rid}" if rtype == "Patient" else (_ref_tail(resource.get("subject")) or _ref_tail(resource.get("patient")))
                if patient_ref is None or not patient_ref.startswith("Patient/"):
                    continue
                if members is not None and patient_ref not in members:
                    continue
            files.setdefault(rtype, []).append(copy.deepcopy(resource))
        job = _Job(str(uuid.uuid4()), f"{self.origin}{req.path}", self._next_instant(), files)
        self._jobs[job.id] = job
        return _Response(202, b"", {"Content-Location": f"{self.origin}/bulk/status/{job.id}"})

    def _bulk_endpoint(self, req: RecordedRequest, segs: list[str]) -> _Response:
        if len(segs) == 2 and segs[0] == "status":
            job = self._jobs.get(segs[1])
            if job is None:
                return self._error(404, "not-found", "unknown export job")
            if req.method == "DELETE":
                del self._jobs[job.id]
                return _Response(202)
            if job.polls < self.bulk_polls_before_ready:
                job.polls += 1
                pct = int(100 * job.polls / (self.bulk_polls_before_ready + 1))
                return _Response(202, b"", {"X-Progress": f"{pct}% complete", "Retry-After": str(self.bulk_retry_after)})
            file_base = (self.bulk_file_base or self.origin).rstrip("/")
            manifest = {
                "transactionTime": job.transaction_time,
                "request": job.request,
                "requiresAccessToken": self.require_auth,
                "output": [{"type": t, "url": f"{file_base}/bulk/files/{job.id}/{t}.ndjson", "count": len(rs)} for t, rs in sorted(job.files.items())],
                "error": [],
            }
            return self._json(
                200,
                manifest,
                {"Expires": format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)},
                "application/json",
            )
        if len(segs) == 3 and segs[0] == "files" and req.method == "GET":
            job = self._jobs.get(segs[1])
            rtype = segs[2].removesuffix(".ndjson")
            if job is None or rtype not in job.files:
                return self._error(404, "not-found", "unknown file")
            payload = b"".join(orjson.dumps(r) + b"\n" for r in job.files[rtype])
            return _Response(200, payload, {"Content-Type": "application/fhir+ndjson"})
        return self._error(404, "not-found", "unknown bulk path")

    # --- Backport operations ------------------------------------------------------------------
    def _operation_params(self, req: RecordedRequest) -> dict[str, str]:
        params = {k: v[0] for k, v in req.query.items() if v}
        if req.method == "POST" and req.body:
            body = orjson.loads(req.body)
            for p in body.get("parameter", []) if isinstance(body, dict) else []:
                value = next((v for k, v in p.items() if k.startswith("value")), None)
                if isinstance(p.get("name"), str) and value is not None:
                    params[p["name"]] = str(value)
        return params

    def _subscription_events(self, req: RecordedRequest, sub_id: str) -> _Response:
        sub = self._subs.get(sub_id)
        if sub is None:
            return self._error(404, "not-found", "unknown subscription")
        params = self._operation_params(req)
        try:
            since = int(params["eventsSinceNumber"]) if "eventsSinceNumber" in params else 1
            until = int(params["eventsUntilNumber"]) if "eventsUntilNumber" in params else len(sub.events)
        except ValueError:
            return self._error(400, "invalid", "event numbers must be integers")
        content = params.get("content", sub.content)
        if content not in ("empty", "id-only", "full-resource"):
            return self._error(400, "invalid", "content must be empty, id-only or full-resource")
        events = [e for e in sub.events if since <= e.number <= until]
        return self._json(200, self._events_bundle(sub, events, type="query-event", content=content))  # type: ignore[arg-type]

    def _subscription_status(self, req: RecordedRequest, sub_id: str | None) -> _Response:
        if sub_id is not None:
            if sub_id not in self._subs:
                return self._error(404, "not-found", "unknown subscription")
            subs = [self._subs[sub_id]]
        else:
            wanted = {i for v in req.query.get("id", []) for i in v.split(",") if i}
            subs = [s for s in self._subs.values() if not wanted or s.id in wanted]
        statuses = [
            make_status_parameters(
                subscription=f"{self.base_url}/Subscription/{s.id}",
                type="query-status",
                status=s.status,
                topic=s.topic,
                events_since_start=len(s.events),
                base_url=self.base_url,
            )
            for s in subs
        ]
        return self._json(200, make_status_bundle(statuses, base_url=self.base_url))

"""CDS_TLS_CA_FILE: every outbound HTTPS client trusts a hospital's internal CA when named, and only then.

Real TLS servers on 127.0.0.1 with a certificate issued by a test CA that nothing else trusts: the FHIR server
double (FhirClient reads, SMART backend token requests), the same server behind the CDS Hooks prefetch fallback
(aiohttp), and an EHR's JWK Set (the JWT verifier)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from service import cli
from service.config import Settings
from service.fhir.client import client_from_settings
from service.fhir.errors import FhirError
from service.fhir.hook_fetch import FetchResult, HookFetcher
from service.security import AuthenticationError, build_verifier
from service.tls import CaFileError, check_ca_file, client_ssl_context, tls_problem
from tests.fakes.fhir_server import FakeFhirServer, make_keypair
from tests.pki import Pki
from tests.service.api.support import serve_in_thread
from tests.service.conftest import RunCli
from tests.service.security.support import AUD, ISS, bearer, claims, new_ec_key, sign

UNTRUSTED = "TLS certificate not trusted: unable to get local issuer certificate"


@pytest.fixture
def tls_fhir(pki: Pki) -> Iterator[FakeFhirServer]:
    with FakeFhirServer(tls=pki.server_context()) as srv:
        srv.put({"resourceType": "Patient", "id": "p1", "gender": "female"})
        yield srv


def fetch_once(fetcher: HookFetcher, base: str) -> FetchResult:
    """The prefetch fallback's answer for one key (``Patient/p1``) from ``base``, the fetcher closed after."""

    async def run() -> FetchResult:
        try:
            return (await fetcher.fetch_all(base, "token", {"patient": "Patient/p1"}))["patient"]
        finally:
            await fetcher.aclose()

    return asyncio.run(run())


def ca_names(context: ssl.SSLContext) -> list[str | None]:
    return [dict(item[0] for item in cert["subject"]).get("commonName") for cert in context.get_ca_certs()]


# --- the setting ------------------------------------------------------------------------------
def test_the_ca_file_is_added_to_the_default_trust(pki: Pki) -> None:
    default = client_ssl_context()
    extended = client_ssl_context(pki.ca_file)
    assert pki.ca_name in ca_names(extended) and pki.ca_name not in ca_names(default)
    assert len(extended.get_ca_certs()) == len(default.get_ca_certs()) + 1  # the public CAs are still trusted
    assert extended.verify_mode == ssl.CERT_REQUIRED and extended.check_hostname
    assert client_ssl_context(pki.ca_file) is extended  # one context per file for the process
    assert client_ssl_context(None) is default
    aiohttp_context = client_ssl_context(pki.ca_file, owner="aiohttp")
    assert aiohttp_context is not extended  # httpcore sets ALPN on its own context: never on aiohttp's
    assert len(aiohttp_context.get_ca_certs()) == len(extended.get_ca_certs())


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda d, p: d / "missing.pem", "does not exist"),
        (lambda d, p: d, "a directory"),
        (lambda d, p: _write(d / "junk.pem", "not a certificate at all"), "no PEM CA certificate"),
        (lambda d, p: _write(d / "key.pem", p.key_file.read_text()), "no PEM CA certificate"),
        (lambda d, p: p.cert_file, "holds no CA certificate"),
    ],
    ids=["missing", "directory", "junk", "private-key", "server-certificate-only"],
)
def test_an_unusable_ca_file_is_refused_at_start_up(tmp_path: Path, pki: Pki, make: object, reason: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make(tmp_path, pki)  # type: ignore[operator]
    with pytest.raises(CaFileError, match=reason):
        check_ca_file(path)
    monkeypatch.setenv("CDS_TLS_CA_FILE", str(path))
    with pytest.raises(ValidationError, match=f"CDS_TLS_CA_FILE cannot be used: .*{reason}"):
        Settings()


def test_an_empty_ca_file_setting_means_none(monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
    monkeypatch.setenv("CDS_TLS_CA_FILE", " ")
    assert Settings().tls_ca_file is None
    monkeypatch.setenv("CDS_TLS_CA_FILE", str(pki.ca_file))
    assert Settings().tls_ca_file == pki.ca_file


@pytest.mark.parametrize("command", ["serve", "worker", "beat", "migrate"])
def test_every_process_refuses_an_unusable_ca_file_in_one_line(tmp_path: Path, run_cli: RunCli, command: str) -> None:
    code, lines = run_cli([command], CDS_TLS_CA_FILE=str(tmp_path / "missing.pem"))
    assert code == 2, lines
    assert lines == ["calcinosis-cds: error: invalid setting tls_ca_file: CDS_TLS_CA_FILE cannot be used: the file does not exist"]


def test_worker_starts_celery_once_the_settings_are_good(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: RunCli, pki: Pki) -> None:
    started: list[list[str]] = []
    monkeypatch.setattr(cli, "_exec_celery", started.append)  # Celery itself is not under test
    code, lines = run_cli(["worker", "--queues", "evaluate"], CDS_TLS_CA_FILE=str(pki.ca_file), CDS_DATA_DIR=str(tmp_path))
    assert code == 0, lines
    assert started and started[0][:3] == ["worker", "-Q", "evaluate"]


def test_operator_commands_name_an_untrusted_certificate_in_one_line(tmp_path: Path, run_cli: RunCli, tls_fhir: FakeFhirServer, pki: Pki) -> None:
    env = {"CDS_FHIR_BASE_URL": tls_fhir.base_url, "CDS_DATA_DIR": str(tmp_path), "CDS_FHIR_MAX_RETRIES": "0"}
    code, lines = run_cli(["subscriptions", "list"], **env)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("calcinosis-cds: error: FHIR server: GET https://127.0.0.1:")
    assert lines[0].endswith(f"failed: {UNTRUSTED}")
    assert run_cli(["subscriptions", "list"], **env, CDS_TLS_CA_FILE=str(pki.ca_file)) == (0, [])  # the (empty) list


# --- the FHIR client and SMART backend auth (httpx) ---------------------------------------------
def test_fhir_client_trusts_the_internal_ca_only_when_configured(tls_fhir: FakeFhirServer, pki: Pki) -> None:
    base = tls_fhir.base_url
    assert base.startswith("https://")
    backoffs: list[float] = []
    with client_from_settings(Settings(fhir_base_url=base, fhir_max_retries=3), sleep=backoffs.append) as client, pytest.raises(
        FhirError, match=UNTRUSTED
    ):
        client.read("Patient", "p1")
    assert backoffs == []  # a rejected certificate is reported at once, not retried after backoffs
    with client_from_settings(Settings(fhir_base_url=base, tls_ca_file=pki.ca_file)) as client:
        assert client.read("Patient", "p1")["gender"] == "female"


def test_smart_backend_token_request_uses_the_same_trust(tmp_path: Path, pki: Pki) -> None:
    keys = make_keypair("ES384", kid="k1")
    with FakeFhirServer(tls=pki.server_context(), require_auth=True, smart_clients={"cds": keys}) as srv:
        srv.put({"resourceType": "Patient", "id": "p1"})
        configured = Settings(
            fhir_base_url=srv.base_url,
            fhir_auth_mode="smart-backend",
            smart_client_id="cds",
            smart_private_key_file=keys.write_private(tmp_path / "smart.pem"),
            smart_key_id="k1",
            smart_alg="ES384",
            tls_ca_file=pki.ca_file,
        )
        with client_from_settings(configured) as client:
            assert client.read("Patient", "p1")["id"] == "p1"
        assert srv.count(path="/auth/token", method="POST") == 1  # the token came over the same TLS trust
        assert srv.token_errors == []


# --- the CDS Hooks prefetch fallback (aiohttp) -------------------------------------------------
def test_prefetch_fallback_trusts_the_internal_ca_only_when_configured(tls_fhir: FakeFhirServer, pki: Pki) -> None:
    assert fetch_once(HookFetcher(timeout_s=5, max_pages=1), tls_fhir.base_url).error == f"unreachable ({UNTRUSTED})"
    internal = HookFetcher(timeout_s=5, max_pages=1, ssl_context=client_ssl_context(pki.ca_file, owner="aiohttp"))
    result = fetch_once(internal, tls_fhir.base_url)
    assert (result.error, [r["id"] for r in result.resources]) == (None, ["p1"])


def test_tls_spoken_to_a_plain_http_server_is_named_a_handshake_failure() -> None:
    with FakeFhirServer() as plain:
        base = plain.base_url.replace("http://", "https://")
        with client_from_settings(Settings(fhir_base_url=base, fhir_max_retries=0)) as client, pytest.raises(FhirError, match=r"TLS handshake failed \("):
            client.read("Patient", "p1")
        # aiohttp's handshake error carries no reason of its own: the one it wraps is named (and nothing escapes)
        assert fetch_once(HookFetcher(timeout_s=5, max_pages=1), base).error == "unreachable (TLS handshake failed (WRONG_VERSION_NUMBER))"
    assert tls_problem(ConnectionRefusedError()) is None and tls_problem(ValueError("x")) is None


def test_a_tls_error_raised_while_connecting_is_an_error_for_its_key() -> None:
    class BrokenTls(aiohttp.TCPConnector):  # a bare ssl.SSLError from the connector, not a handshake it ran
        async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
            raise ssl.SSLError(1, "bad record mac")

    fetcher = HookFetcher(timeout_s=5, max_pages=1, connector=BrokenTls)
    assert fetch_once(fetcher, "https://fhir.example.org/r4").error == "unreachable (TLS handshake failed (SSLError))"


# --- an EHR's JWK Set on an internal server (the JWT verifier) -----------------------------------
def test_jwt_verifier_fetches_an_issuers_keys_over_the_internal_ca(pki: Pki) -> None:
    key = new_ec_key()
    jwks = Starlette(routes=[Route("/jwks", lambda request: JSONResponse(key.jwks()))])
    with serve_in_thread(jwks, tls=(pki.cert_file, pki.key_file)) as origin:
        issuer = {"iss": ISS, "jwks_url": f"{origin}/jwks"}
        untrusting = build_verifier(Settings(trusted_issuers=[issuer]))
        try:
            with pytest.raises(AuthenticationError, match="TLS certificate not trusted"):
                untrusting.verify(bearer(sign(key, claims())), AUD)
        finally:
            untrusting.close()
        verifier = build_verifier(Settings(trusted_issuers=[issuer], tls_ca_file=pki.ca_file))
        try:
            assert verifier.verify(bearer(sign(key, claims())), AUD).iss == ISS
        finally:
            verifier.close()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path

"""Settings read from the environment: the prefetch-fallback proxy is an http(s) URL or nothing, kept secret."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from service.config import Settings, TrustedIssuer


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", None),
        ("  ", None),
        ("http://proxy.example.org:3128", "http://proxy.example.org:3128"),
        ("https://user:pa55@proxy.example.org/", "https://user:pa55@proxy.example.org/"),
    ],
)
def test_hook_fetch_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch, raw: str, expected: str | None) -> None:
    monkeypatch.setenv("CDS_HOOK_FETCH_PROXY", raw)
    proxy = Settings().hook_fetch_proxy
    assert (proxy.get_secret_value() if proxy is not None else None) == expected
    if proxy is not None:
        assert "pa55" not in repr(Settings())


@pytest.mark.parametrize(
    "raw",
    [
        "proxy.example.org:3128",
        "socks5://user:s3cr3t@proxy.example.org",
        "http://",
        "http://user:s3cr3t@proxy.example.org:99999",
        "http://proxy.example.org:3128/path",
        "http://proxy.example.org:3128?x=s3cr3t",
    ],
)
def test_a_hook_fetch_proxy_that_is_not_a_proxy_url_is_refused_without_echoing_it(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("CDS_HOOK_FETCH_PROXY", raw)
    with pytest.raises(ValidationError, match="CDS_HOOK_FETCH_PROXY must be http") as refused:
        Settings()
    assert "s3cr3t" not in str(refused.value) and raw not in str(refused.value)


@pytest.mark.parametrize("entry", ["http://fhir.example.org/r4", "fhir.example.org/r4", "https://"])
def test_a_fhir_server_allowlist_entry_that_is_not_https_is_refused_outside_development_mode(monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    monkeypatch.setenv("CDS_FHIR_SERVER_ALLOWLIST", f"https://ehr.example.org/fhir,{entry}")
    with pytest.raises(ValidationError, match="entry 2 is not"):
        Settings()
    monkeypatch.setenv("CDS_DEV_MODE", "true")  # development mode does not restrict fhirServer at all
    assert Settings().fhir_server_allowlist[1] == entry


def test_a_jwks_file_that_cannot_verify_a_call_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    issuer = '[{"iss": "https://ehr.example.org", "jwks_file": "%s"}]'
    monkeypatch.setenv("CDS_TRUSTED_ISSUERS", issuer % (tmp_path / "missing.json"))
    with pytest.raises(ValidationError, match=r"jwks_file cannot be used: cannot read JWK Set file \(FileNotFoundError\)"):
        Settings()
    symmetric = tmp_path / "hmac.json"
    symmetric.write_text('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
    monkeypatch.setenv("CDS_TRUSTED_ISSUERS", issuer % symmetric)
    with pytest.raises(ValidationError, match="holds no ES384/RS384 signing key"):
        Settings()
    junk = tmp_path / "junk.json"
    junk.write_text("not json")
    monkeypatch.setenv("CDS_TRUSTED_ISSUERS", issuer % junk)
    with pytest.raises(ValidationError, match="not valid JSON"):
        Settings()


def test_log_level_is_one_of_the_documented_levels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDS_LOG_LEVEL", "warning")
    assert Settings().log_level == "WARNING"
    monkeypatch.setenv("CDS_LOG_LEVEL", "LOUD")
    with pytest.raises(ValidationError, match="log_level"):
        Settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CDS_DATABASE_URL", "garbage"),
        ("CDS_DATABASE_URL", "postgresql+nodriver://user:s3cr3t@db.example.org/cds"),
        ("CDS_BROKER_URL", "garbage://user:s3cr3t@broker.example.org"),
    ],
)
def test_a_database_or_broker_url_nothing_can_connect_with_is_refused_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert name in str(refused.value) and "s3cr3t" not in str(refused.value)


def test_working_database_and_broker_urls_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDS_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/cds")
    monkeypatch.setenv("CDS_BROKER_URL", "redis://127.0.0.1:6379/0")
    settings = Settings()
    assert settings.database_url.startswith("postgresql+psycopg") and settings.broker_url.startswith("redis://")


@pytest.mark.parametrize("command", ["serve", "worker", "beat", "migrate", "events"])
def test_a_json_setting_that_does_not_parse_is_one_line_and_exit_2(run_cli, command: str) -> None:
    code, lines = run_cli([command], CDS_TRUSTED_ISSUERS="notjson")
    assert code == 2
    assert lines == ['calcinosis-cds: error: invalid setting: error parsing value for field "trusted_issuers" from source "EnvSettingsSource"']


def test_a_refused_combination_of_settings_is_one_clean_line(run_cli) -> None:
    code, lines = run_cli(["migrate"], CDS_ENVIRONMENT="production", CDS_TRUST_SANDBOX="true")
    assert code == 2
    assert lines == ["calcinosis-cds: error: invalid setting: CDS_TRUST_SANDBOX is refused when CDS_ENVIRONMENT=production (its private key is public)"]


def test_production_refuses_to_start_without_public_base_urls(run_cli) -> None:
    """Without them the expected JWT aud would come from the client's Host header (see service.api.cds_hooks)."""
    code, lines = run_cli(["beat"], CDS_ENVIRONMENT="production")
    assert code == 2
    assert lines == [
        "calcinosis-cds: error: invalid setting: CDS_PUBLIC_BASE_URLS is required when CDS_ENVIRONMENT=production (the JWT aud is checked against it)"
    ]
    for environment in ("local", "test"):  # outside production the URL as received stays the audience (the Sandbox)
        assert Settings(environment=environment).public_base_urls == []


@pytest.mark.parametrize("entry", ["cds.example.org", "https://", "ftp://cds.example.org", "https://cds.example.org/?x=1"])
def test_a_public_base_url_that_is_not_an_http_base_url_is_refused(monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    monkeypatch.setenv("CDS_PUBLIC_BASE_URLS", f"https://cds.example.org/api,{entry}")
    with pytest.raises(ValidationError, match=r"CDS_PUBLIC_BASE_URLS entries must be http\(s\) base URLs, scheme and host \(entry 2 is not\)"):
        Settings()


def test_production_refuses_to_start_without_a_shared_replay_cache(run_cli) -> None:
    """The in-memory jti cache is per process: with several processes or replicas a token is accepted once by each."""
    code, lines = run_cli(["beat"], CDS_ENVIRONMENT="production", CDS_PUBLIC_BASE_URLS="https://cds.example.org")
    assert code == 2
    assert lines == [
        "calcinosis-cds: error: invalid setting: CDS_REDIS_URL is required when CDS_ENVIRONMENT=production (the JWT replay cache every process shares)"
    ]
    settings = Settings(environment="production", public_base_urls=["https://cds.example.org"], redis_url="redis://127.0.0.1:6379/1")
    assert settings.redis_url == "redis://127.0.0.1:6379/1"


PRODUCTION = {"environment": "production", "public_base_urls": ["https://cds.example.org"], "redis_url": "redis://127.0.0.1:6379/1"}


@pytest.mark.parametrize(
    ("issuer", "where"),
    [
        ({"jwks_url": "http://ehr.example.org/jwks.json"}, "jwks_url"),
        (
            {"jwks_url": "https://ehr.example.org/jwks.json", "jku_allowlist": ["https://ehr.example.org/a.json", "http://ehr.example.org/b.json"]},
            "jku_allowlist entry 2",
        ),
        ({"jku_allowlist": ["ehr.example.org/jwks.json"]}, "jku_allowlist entry 1"),
    ],
)
def test_production_refuses_a_jwk_set_url_that_is_not_https(issuer: dict[str, Any], where: str) -> None:
    trusted = [TrustedIssuer(iss="https://ehr.example.org", **issuer)]
    with pytest.raises(ValidationError, match=f"issuer https://ehr.example.org: {where} must be an https URL when CDS_ENVIRONMENT=production"):
        Settings(**PRODUCTION, trusted_issuers=trusted)
    # Outside production (local JWK Set servers in tests and development) http is accepted.
    assert Settings(environment="test", trusted_issuers=trusted).trusted_issuers == trusted


def test_production_accepts_https_jwk_set_urls() -> None:
    trusted = [TrustedIssuer(iss="https://ehr.example.org", jwks_url="https://ehr.example.org/jwks.json", jku_allowlist=("https://ehr.example.org/k.json",))]
    assert Settings(**PRODUCTION, trusted_issuers=trusted).trusted_issuers == trusted

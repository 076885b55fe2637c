"""Settings read from the environment: the prefetch-fallback proxy is an http(s) URL or nothing, kept secret."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config import Settings


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

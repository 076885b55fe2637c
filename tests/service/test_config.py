"""Settings read from the environment: the prefetch-fallback proxy is an http(s) URL or nothing."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config import Settings


@pytest.mark.parametrize(("raw", "expected"), [("", None), ("  ", None), ("http://proxy.example.org:3128", "http://proxy.example.org:3128")])
def test_hook_fetch_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch, raw: str, expected: str | None) -> None:
    monkeypatch.setenv("CDS_HOOK_FETCH_PROXY", raw)
    assert Settings().hook_fetch_proxy == expected


@pytest.mark.parametrize("raw", ["proxy.example.org:3128", "socks5://proxy.example.org", "http://"])
def test_a_hook_fetch_proxy_that_is_not_an_http_url_is_refused_at_start(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("CDS_HOOK_FETCH_PROXY", raw)
    with pytest.raises(ValidationError, match="CDS_HOOK_FETCH_PROXY must be an http"):
        Settings()

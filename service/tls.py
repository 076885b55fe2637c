"""The TLS trust of every outbound HTTPS connection: FHIR servers (monitoring, write-back and the CDS Hooks prefetch
fallback), SMART token endpoints and EHR JWK Sets.

Every client gets a context built the same way (one per CA file and client library, for the whole process), so
the httpx clients and the aiohttp fetcher trust the same authorities: httpx's default (certifi's bundle, or the
bundle named by ``SSL_CERT_FILE``/``SSL_CERT_DIR``), plus the PEM file of ``CDS_TLS_CA_FILE`` when set (a
hospital's internal CA, say). The file is added to the default trust, never in place of it: an EHR's public JWK
Set keeps working next to an internal FHIR server.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Literal


class CaFileError(ValueError):
    """The CA file cannot be used; the message names the problem, never the file's content."""


def check_ca_file(path: Path) -> None:
    """Raise :class:`CaFileError` unless ``path`` is a readable PEM file holding at least one CA certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(path))
    except FileNotFoundError:
        raise CaFileError("the file does not exist") from None
    except IsADirectoryError:
        raise CaFileError("it is a directory, not a PEM file") from None
    except PermissionError:
        raise CaFileError("the file cannot be read (permission denied)") from None
    except (ssl.SSLError, OSError, UnicodeDecodeError):
        raise CaFileError("no PEM CA certificate could be read from it") from None
    if not context.get_ca_certs():
        raise CaFileError("it holds no CA certificate (only end-entity certificates or none)")


def client_ssl_context(ca_file: Path | None = None, *, owner: Literal["httpx", "aiohttp"] = "httpx") -> ssl.SSLContext:
    """The client context for outbound HTTPS: the default trust, plus ``ca_file`` (checked by the settings) if given.
    Built once per file and owner: loading certifi's bundle costs milliseconds, and a context serves any number of
    connections and threads. Each client library has its own, because httpcore sets the ALPN protocols of the
    context it is given at every connection (enabling HTTP/2 on an httpx client must not make aiohttp offer h2).
    A changed CA file is read at the next start (a rollout restart), not while running."""
    return _context(ca_file, owner)


@lru_cache(maxsize=8)
def _context(ca_file: Path | None, owner: str) -> ssl.SSLContext:
    import httpx  # here, not at module level: the settings import this module, and the offline CLI needs no httpx

    context = httpx.create_ssl_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what caused it, each once."""
    current: BaseException | None = exc
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def certificate_rejected(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a server certificate that failed verification: retrying will not help until the
    trust (``CDS_TLS_CA_FILE``) or the server's certificate changes."""
    return any(isinstance(e, ssl.SSLCertVerificationError) for e in _chain(exc))


def tls_problem(exc: BaseException) -> str | None:
    """A short, data-free description when ``exc`` (or what caused it) is a TLS failure, else None. The usual one
    on a hospital network, a server certificate issued by an internal CA that is not trusted, says which check
    failed (``unable to get local issuer certificate``, ``certificate has expired``, a host name mismatch)."""
    found: str | None = None
    for current in _chain(exc):
        if isinstance(current, ssl.SSLCertVerificationError):  # aiohttp's certificate error is one too, without detail
            detail = getattr(current, "verify_message", None)
            if isinstance(detail, str) and detail:
                return f"TLS certificate not trusted: {detail}"
            found = "TLS certificate not trusted"
        elif isinstance(current, ssl.SSLError) and found is None:
            # aiohttp's handshake error is an ssl.SSLError without a reason: the one it wraps has it
            reason = getattr(current, "reason", None)
            if isinstance(reason, str) and reason:
                found = f"TLS handshake failed ({reason})"
            elif current.__cause__ is None and current.__context__ is None:
                found = f"TLS handshake failed ({type(current).__name__})"
    return found

"""The TLS trust of every outbound HTTPS connection: FHIR servers (monitoring, write-back and the CDS Hooks prefetch
fallback), SMART token endpoints and EHR JWK Sets.

One context per CA file for the whole process, shared by the httpx clients and the aiohttp fetcher, so they all
trust the same authorities: httpx's default (certifi's bundle, or the bundle named by ``SSL_CERT_FILE``/
``SSL_CERT_DIR``), plus the PEM file of ``CDS_TLS_CA_FILE`` when set (a hospital's internal CA, say). The file is
added to the default trust, never in place of it: an EHR's public JWK Set keeps working next to an internal FHIR
server.
"""

from __future__ import annotations

import ssl
from functools import lru_cache
from pathlib import Path

import httpx


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


@lru_cache(maxsize=4)
def client_ssl_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """The client context for outbound HTTPS: the default trust, plus ``ca_file`` (checked by the settings) if given.
    Built once per file: loading certifi's bundle costs milliseconds, and a context serves any number of
    connections and threads."""
    context = httpx.create_ssl_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


def tls_problem(exc: BaseException) -> str | None:
    """A short, data-free description when ``exc`` (or what caused it) is a TLS failure, else None. The usual one
    on a hospital network, a server certificate issued by an internal CA that is not trusted, says which check
    failed (``unable to get local issuer certificate``, ``certificate has expired``, a host name mismatch)."""
    current: BaseException | None = exc
    seen: set[int] = set()
    found: str | None = None
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):  # aiohttp's certificate error is one too, without detail
            detail = getattr(current, "verify_message", None)
            if isinstance(detail, str) and detail:
                return f"TLS certificate not trusted: {detail}"
            found = "TLS certificate not trusted"
        elif isinstance(current, ssl.SSLError) and found is None:
            found = f"TLS handshake failed ({current.reason or type(current).__name__})"
        current = current.__cause__ or current.__context__
    return found

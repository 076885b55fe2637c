"""Security of the CDS Hooks endpoints: verification of the CDS Client's JWT (CDS Hooks 2.0)."""

from service.security.jwks import ALLOWED_ALGORITHMS, JwksError, JwksLocation, JwksProvider
from service.security.jwt_verifier import (
    SANDBOX_JKU,
    AuthenticationError,
    IssuerTrust,
    JwtVerifier,
    VerifiedCaller,
    build_verifier,
)
from service.security.replay import MemoryReplayCache, RedisReplayCache, ReplayCache, ReplayCacheError

__all__ = [
    "ALLOWED_ALGORITHMS",
    "SANDBOX_JKU",
    "AuthenticationError",
    "IssuerTrust",
    "JwksError",
    "JwksLocation",
    "JwksProvider",
    "JwtVerifier",
    "MemoryReplayCache",
    "RedisReplayCache",
    "ReplayCache",
    "ReplayCacheError",
    "VerifiedCaller",
    "build_verifier",
]

"""Branches that burn CPU; they run on the cpu queue's prefork pool, one process per core."""

from __future__ import annotations

import hashlib
import math
import zlib

from orchestrator import cpu_task


@cpu_task
def count_primes(limit: int) -> int:
    """Primes below `limit`, by a sieve of Eratosthenes."""
    if limit < 2:
        return 0
    sieve = bytearray([1]) * limit
    sieve[0:2] = b"\x00\x00"
    for p in range(2, math.isqrt(limit - 1) + 1):
        if sieve[p]:
            sieve[p * p :: p] = bytes(len(range(p * p, limit, p)))
    return sum(sieve)


@cpu_task
def sha256_rounds(data: str, rounds: int) -> str:
    """Iterated SHA-256 (key stretching); returns the final hex digest."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    digest = data.encode()
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()


@cpu_task
def compress_ratio(text: str, repeat: int = 1, level: int = 9) -> dict[str, float | int]:
    """zlib-compress `text` repeated `repeat` times: original size, compressed size and ratio."""
    raw = (text * repeat).encode()
    packed = zlib.compress(raw, level)
    return {"bytes": len(raw), "compressed": len(packed), "ratio": round(len(raw) / max(len(packed), 1), 3)}

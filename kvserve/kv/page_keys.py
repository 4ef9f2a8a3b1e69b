"""Prefix-cache page keys: SHA-256 chains over token ids, so that equal keys mean equal prefixes.

Python's hash() of a token tuple is 64 bits and deterministic, so prompts with colliding keys can
be crafted and one request would then read another's KV (vLLM's CVE-2025-25183). SHA-256 makes
that infeasible, and its digests are equal in every process, as a data-parallel router that
routes by prefix needs. A page's key covers the salt and every token before it: the salt is
hashed into the root, and each key is SHA-256(parent key || the page's tokens as uint32 LE).
"""
import hashlib
import struct

_DOMAIN = b"kvserve/prefix/v1\0"


def root_key(salt: str | None) -> bytes:
    """The parent of a sequence's first page: requests with different salts share no page."""
    return hashlib.sha256(_DOMAIN + (b"" if salt is None else b"\1" + salt.encode("utf-8"))).digest()


def page_keys(token_ids: list[int], page_size: int, parent: bytes, start_page: int = 0) -> list[bytes]:
    """Key of each full page of token_ids from start_page on; `parent` is the key of the page
    before start_page (root_key(salt) when start_page is 0)."""
    keys = []
    pack = struct.Struct(f"<{page_size}I").pack
    for start in range(start_page * page_size, len(token_ids) - page_size + 1, page_size):
        parent = hashlib.sha256(parent + pack(*token_ids[start:start + page_size])).digest()
        keys.append(parent)
    return keys

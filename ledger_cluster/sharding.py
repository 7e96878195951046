"""The shard key of an account. Pinned by a golden test: if it changed, every stored account
would belong to another shard."""

import functools
import hashlib

SHARD_KEY_MAX = 2**32 - 1


# Every item of a batch entry checks its account's shard on every replica; accounts repeat.
SHARD_KEY_CACHE_ENTRIES = 65_536


@functools.lru_cache(maxsize=SHARD_KEY_CACHE_ENTRIES)
def shard_key(account_id: int) -> int:
    """First 4 bytes (big-endian) of sha256 of the account id as 8 big-endian bytes."""
    digest = hashlib.sha256(account_id.to_bytes(8, "big")).digest()
    return int.from_bytes(digest[:4], "big")

"""The scheduler's prefix cache: prompt blocks kept in a KV pool for later prompts to adopt."""

from __future__ import annotations

import collections
import itertools
from typing import Sequence as Seq

import numpy as np

# Blocks after the matched run that a lookup compares with the prompt's next tokens, the most recently
# added first: a system prompt followed by thousands of cached user turns must not make every
# admission scan them all (a partial block saves at most block_size - 1 rows).
MAX_PARTIAL_CANDIDATES = 64


class PrefixCache:
    """Full prompt blocks kept in the pool after their sequence is done, keyed by the adapter slot
    that computed them and the tokens of the whole prefix up to them. Each entry holds one
    reference to its block. A prompt reuses the longest run of whole blocks, then the first tokens
    of one more cached block that follows the same run (a prompt that went on differently, e.g. the
    same system prompt before another user turn): its K/V at those positions are the same, and the
    cache copies the block before writing into it."""

    def __init__(self, pool):
        self.pool = pool
        self.entries: collections.OrderedDict[bytes, int] = collections.OrderedDict()   # LRU first
        self.children: dict[bytes, dict[bytes, np.ndarray]] = {}   # key of a run -> {key: tokens} of the blocks after it
        self.run_of: dict[bytes, bytes] = {}                         # key -> the key of the run before its block

    @staticmethod
    def _keys(tokens: Seq[int], block_size: int, n_blocks: int, adapter: int) -> list[bytes]:
        arr = np.concatenate([[adapter], np.asarray(tokens[: n_blocks * block_size])]).astype(np.int32)
        return [arr[: 1 + (i + 1) * block_size].tobytes() for i in range(n_blocks)]

    def lookup(self, tokens: Seq[int], block_size: int, adapter: int = -1) -> tuple[list[int], int]:
        """Blocks of the longest cached prefix of tokens and how many tokens of them it covers (the
        last block may be covered in part), most recently used now."""
        blocks = []
        run = np.asarray([adapter], np.int32).tobytes()
        for key in self._keys(tokens, block_size, len(tokens) // block_size, adapter):
            b = self.entries.get(key)
            if b is None:
                break
            blocks.append(b)
            self.entries.move_to_end(key)
            run = key
        n_tokens = len(blocks) * block_size
        rest = np.asarray(tokens[n_tokens : n_tokens + block_size], np.int32)
        best, best_key = 0, None
        candidates = self.children.get(run, {})
        for key in itertools.islice(reversed(candidates), MAX_PARTIAL_CANDIDATES):
            block_tokens = candidates[key]
            same = block_tokens[: len(rest)] == rest
            n_same = len(rest) if same.all() else int(np.argmin(same))
            if n_same > best:
                best, best_key = n_same, key
        if best_key is not None:
            blocks.append(self.entries[best_key])
            self.entries.move_to_end(best_key)
        return blocks, n_tokens + best

    def add(self, tokens: Seq[int], table: Seq[int], block_size: int, adapter: int = -1) -> None:
        n = min(len(tokens) // block_size, len(table))
        for key, block in zip(self._keys(tokens, block_size, n, adapter), table[:n]):
            if key not in self.entries:
                self.pool.retain(block)
                self.entries[key] = block
                run = key[: len(key) - 4 * block_size]
                self.children.setdefault(run, {})[key] = np.frombuffer(key[len(run) :], np.int32)
                self.run_of[key] = run
            self.entries.move_to_end(key)

    def evictable(self) -> int:
        return sum(1 for b in self.entries.values() if self.pool.refcount(b) == 1)

    def evict(self, n_blocks: int) -> None:
        """Frees up to n_blocks blocks only the cache holds, least recently used (longest prefix) first."""
        for key in list(self.entries):
            if n_blocks <= 0:
                return
            block = self.entries[key]
            if self.pool.refcount(block) == 1:
                del self.entries[key]
                run = self.run_of.pop(key)
                del self.children[run][key]
                if not self.children[run]:
                    del self.children[run]
                self.pool.release(block)
                n_blocks -= 1

    def clear(self) -> None:
        for block in self.entries.values():
            self.pool.release(block)
        self.entries.clear()
        self.children.clear()
        self.run_of.clear()

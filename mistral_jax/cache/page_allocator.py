"""KV page bookkeeping on the host: reference-counted pages and the automatic prefix cache.

The device holds `num_pages` pages of `page_size` tokens; this module decides which page
numbers each sequence uses. Page 0 is the null page: never handed out, it pads block tables.

Prefix cache. A full page is named by a hash chained over its tokens and its parent page's
hash, so equal names mean equal prefixes up to and including that page. A page whose k/v are
written is registered under its name; a new request reuses the pages of its longest registered
prefix (reference counts let several sequences share them). A freed registered page keeps its
content and name while it waits in an LRU list; it is evicted (name dropped, page reused) only
when plain free pages run out.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import struct
from collections.abc import Sequence

NULL_PAGE = 0
_ROOT = 0  # the parent hash of a sequence's first page


class OutOfPages(RuntimeError):
    """allocate() could not find enough pages; nothing was changed."""


def page_hashes(token_ids: Sequence[int], page_size: int, known: Sequence[int] = ()) -> list[int]:
    """Chained hashes of the full pages of token_ids; `known` are those of its first pages,
    already computed, so that a growing sequence only hashes its new pages. A partial last page
    gets no hash. blake2b: stable across processes and runs (Python's hash() of str is not)."""
    out = list(known)
    for i in range(len(out), len(token_ids) // page_size):
        parent = out[-1] if out else _ROOT
        chunk = token_ids[i * page_size : (i + 1) * page_size]
        data = struct.pack(f"<Q{len(chunk)}q", parent, *chunk)
        out.append(int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little"))
    return out


@dataclasses.dataclass
class PrefixCacheStats:
    lookups: int = 0  # match_prefix calls
    prompt_tokens: int = 0  # tokens looked up
    cached_tokens: int = 0  # of those, served by cached pages

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages}: need at least 2 (page 0 is reserved as the null page)")
        if page_size < 1:
            raise ValueError(f"page_size={page_size}: use a positive number of tokens per page, e.g. 16")
        self.num_pages, self.page_size = num_pages, page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.refs = [0] * num_pages
        self.free_list = collections.deque(range(1, num_pages))  # never used or unnamed
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self.page_of: dict[int, int] = {}  # hash -> page
        self.hash_of: dict[int, int] = {}  # page -> hash
        self.stats = PrefixCacheStats()

    @property
    def num_free_pages(self) -> int:
        return len(self.free_list) + len(self.evictable)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - 1 - self.num_free_pages

    @property
    def num_cached_pages(self) -> int:
        return len(self.hash_of)

    def allocate(self, n: int) -> list[int]:
        """n pages with refcount 1, all or none: plain free pages first, then the least recently
        freed cached ones (their names are dropped)."""
        if n > self.num_free_pages:
            raise OutOfPages(f"asked for {n} pages, {self.num_free_pages} are free")
        pages = []
        for _ in range(n):
            if self.free_list:
                page = self.free_list.popleft()
            else:
                page, _ = self.evictable.popitem(last=False)
                del self.page_of[self.hash_of.pop(page)]
            self.refs[page] = 1
            pages.append(page)
        return pages

    def free(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page of a block table. Named pages enter the LRU tail
        last-page-first, so a sequence's tail is evicted before its (more shared) head."""
        for page in pages:
            if not 0 < page < self.num_pages or self.refs[page] <= 0:
                raise ValueError(f"page {page} is not allocated (null, out of range, or freed twice)")
        if len(set(pages)) != len(pages):
            raise ValueError("a block table lists a page twice")
        for page in reversed(pages):
            self.refs[page] -= 1
            if self.refs[page] == 0:
                if page in self.hash_of:
                    self.evictable[page] = None
                else:
                    self.free_list.append(page)

    def match_prefix(self, token_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """(cached pages of the longest registered prefix, hashes of all full pages). At most
        (len - 1) // page_size pages: the last token is always computed, for its logits.
        The returned pages gain a reference."""
        hashes = page_hashes(token_ids, self.page_size)
        pages: list[int] = []
        if self.enable_prefix_caching:
            for h in hashes[: (len(token_ids) - 1) // self.page_size]:
                page = self.page_of.get(h)
                if page is None:
                    break
                pages.append(page)
            for page in pages:
                self.evictable.pop(page, None)
                self.refs[page] += 1
        self.stats.lookups += 1
        self.stats.prompt_tokens += len(token_ids)
        self.stats.cached_tokens += len(pages) * self.page_size
        return pages, hashes

    def register(self, page: int, page_hash: int) -> None:
        """The page (held by a sequence) now holds the full page named page_hash. A name already
        held by another page keeps that page: this one stays unnamed and is freed normally."""
        if not self.enable_prefix_caching:
            return
        if not 0 < page < self.num_pages or self.refs[page] <= 0:
            raise ValueError(f"page {page} is not allocated: only a held page can be registered")
        current = self.hash_of.get(page)
        if current is not None:
            if current != page_hash:
                raise ValueError(f"page {page} already holds other content (hash {current})")
            return
        if page_hash in self.page_of:
            return
        self.page_of[page_hash] = page
        self.hash_of[page] = page_hash

    def release_all(self) -> None:
        """Drop every reference at once, for when no sequence holds a page any more (the
        scheduler's drop_all). Named pages keep their content and name, in the LRU; the others
        become plain free pages. Afterwards num_used_pages is 0."""
        for page in range(1, self.num_pages):
            if self.refs[page]:
                self.refs[page] = 0
                if page in self.hash_of:
                    self.evictable[page] = None
                else:
                    self.free_list.append(page)

    def reset_prefix_cache(self) -> None:
        """Forget every name; cached free pages become plain free pages."""
        self.free_list.extend(self.evictable)
        self.evictable.clear()
        self.page_of.clear()
        self.hash_of.clear()

    def reset_stats(self) -> None:
        self.stats = PrefixCacheStats()

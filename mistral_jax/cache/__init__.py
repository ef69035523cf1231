"""The KV cache: the interface attention talks to (kv_cache.py), its paged form over a page pool
(paged.py) and the host-side page allocator with the prefix cache (page_allocator.py)."""

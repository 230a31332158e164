"""Cache: pay once per answer (response cache, idempotency store, coalescing, keys, locks)."""

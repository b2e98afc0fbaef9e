"""Registry sources: static engines, the embedded registry and Redis."""

"""HTTP handlers: OpenAI routes (proxied), models, health, admin, metrics."""

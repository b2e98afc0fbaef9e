"""Precise prefix routing from vLLM's KV cache events: decoding the feed (decode.py),
the index it builds (index.py), and the subscription per engine (subscriber.py)."""

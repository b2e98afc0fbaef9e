"""deepinfer-engine: starts, supervises and registers vLLM engines (and simulated ones)."""

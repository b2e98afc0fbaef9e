"""deepinfer-router: one OpenAI-compatible base URL in front of a fleet of vLLM engines."""

__version__ = "0.1.0"

"""A simulated vLLM engine: a pure model of vLLM's paged KV cache with prefix caching and
continuous batching (`model`, `kv_cache`, `tokenizer`, `cost`), served over vLLM's HTTP API
(`server`). See README.md in this folder."""

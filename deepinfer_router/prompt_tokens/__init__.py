"""Prompts as the engine's token ids, computed in the router: what the precise index
(kv_events/) can be asked about for chat and text prompts. The tokenizer itself
(`shared/prompt_tokenizer.py`, shared with the simulated engine) renders and encodes;
`service.py` finds, loads and verifies one per model against an engine's /tokenize."""

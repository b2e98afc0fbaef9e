"""Prompts as the engine's token ids, computed in the router: what the precise index
(kv_events/) can be asked about for chat and text prompts. `tokenizer.py` renders and
encodes (the model's own tokenizer and chat template); `service.py` finds, loads and
verifies a tokenizer per model against an engine's own /tokenize."""

"""What the router and the engine manager share: the engine record, the Redis registry's
wire format and key names, registry URLs (which kind, redacted for logs), the settings
loader, the logging set-up and task helpers.

The engine manager (`engines/deepinfer_engine/`) imports only this package of the router,
and this package imports nothing else of the router (tests/unit/test_import_contracts.py
holds both)."""

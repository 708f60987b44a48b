"""The schema's constants, importable without torch (the CLI's control commands and the client
name modes and formats before any dump is read)."""

SCHEMA_VERSION = 1
MODES: tuple[str, ...] = ("stat", "per_pass", "per_token")
FORMATS = ("pt", "msgpack", "json")

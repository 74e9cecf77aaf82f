"""Typed, validated records shared by the build, the loader and the tools; SCHEMA_VERSION versions the shard format."""
from schemas.errors import SchemaError
from schemas.sample import ACTION_LABELS, ACTIONS, CompactFrame, EncodedText, SampleRecord, frame_key, safe_key

SCHEMA_VERSION = 1

__all__ = [
    "SCHEMA_VERSION", "SchemaError", "ACTIONS", "ACTION_LABELS", "CompactFrame", "EncodedText",
    "SampleRecord", "frame_key", "safe_key",
]

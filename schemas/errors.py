"""The one error type raised for invalid input: it names where, which field, what was expected and what was found."""
from __future__ import annotations


class SchemaError(ValueError):
    """Invalid input at a boundary (episode JSON, annotation file, config, manifest, shard member)."""

    def __init__(self, where: str, field: str, expected: str, found: object):
        self.where, self.field, self.expected, self.found = where, field, expected, found
        shown = repr(found)
        if len(shown) > 200:
            shown = shown[:200] + "…"
        super().__init__(f"{where}: field {field!r}: expected {expected}, found {shown}")

    def __reduce__(self):
        # Rebuild from the constructor arguments, so the type survives DataLoader workers and Ray tasks.
        return (type(self)._restore, (self.__dict__, self.args))

    @classmethod
    def _restore(cls, state: dict, args: tuple) -> "SchemaError":
        error = cls.__new__(cls)
        error.__dict__.update(state)
        error.args = args
        return error

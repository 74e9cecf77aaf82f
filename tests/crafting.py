"""Helpers for tests that craft bad shards by hand."""
from __future__ import annotations

import io
import tarfile


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    """An ordinary tar (python tarfile) of the given members, for crafting bad shards."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()

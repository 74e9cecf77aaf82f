"""Shard files: the project's only tar writer and parser (member layout: docs/design.md "Shard format").

Writing is deterministic (ustar, mtime 0, uid/gid 0, mode 0o644, members in the given order, one-shot
zstd with checksum and content size) and atomic (temporary name, then rename or upload). Reading is a
single forward pass over any byte stream: each header's type, name and size are checked before its
data is read, members are decoded in memory only, and every error is a ShardError naming shard + member.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import fsspec
import zstandard
from fsspec.core import url_to_fs  # noqa: F401  (re-exported, like the manifest I/O: the build uses them from here)
from fsspec.implementations.local import LocalFileSystem

from schemas.errors import SchemaError
from schemas.manifest import read_manifest, write_manifest  # noqa: F401
from schemas.sample import CompactFrame
from schemas.stored import (FRAME_EXTS, KEY_PATTERN, MAX_SEQUENCE_LENGTH, SAMPLE_EXTS, MemberRef, PackedFrame,
                            ShardError, StoredSample, decode_frame_header, decode_sample_header, decode_tokens,
                            decode_vggt, encode_frame, encode_sample, member_caps)

log = logging.getLogger(__name__)

DEFAULT_ZSTD_LEVEL = 3
MAX_MEMBER_BYTES = 1 << 30  # refused from the header alone, whatever the extension
_READ_BUFFER_BYTES = 1 << 20
Record = CompactFrame | PackedFrame | StoredSample


@dataclass(frozen=True)
class ShardInfo:
    """What writing a shard produced (the build turns it into a manifest ShardRecord)."""

    bytes: int
    sha256: str
    frames: int
    samples: int
    tokens: int  # Σ L over samples


@dataclass
class ShardContents:
    """A whole shard in memory: frames by key, samples in stored order."""

    frames: dict[str, CompactFrame] = field(default_factory=dict)
    samples: list[StoredSample] = field(default_factory=list)


# ---------------------------------------------------------------- writing
class _HashingWriter:
    """File-object wrapper that hashes and counts the bytes tarfile writes."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.sha256, self.num_bytes = raw, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.raw.write(data)
        self.sha256.update(data)
        self.num_bytes += len(data)
        return len(data)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type = len(data), 0, 0o644, tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard_stream(fileobj: BinaryIO, frames: Iterable[CompactFrame | PackedFrame], samples: Iterable[StoredSample],
                       zstd_level: int = DEFAULT_ZSTD_LEVEL) -> ShardInfo:
    """Write one shard to `fileobj`: all frames (each key once; a PackedFrame's bytes as read), then samples
    referring to them."""
    out = _HashingWriter(fileobj)
    compressor = zstandard.ZstdCompressor(level=zstd_level, write_checksum=True, write_content_size=True)
    frame_keys: set[str] = set()
    sample_keys: set[str] = set()
    num_tokens = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:  # type: ignore[call-overload]
        for frame in frames:
            if frame.key in frame_keys:
                raise SchemaError("write_shard", "frames", "each frame key once per shard", frame.key)
            frame_keys.add(frame.key)
            for name, data in encode_frame(frame, compressor):
                _add_member(tar, name, data)
        for sample in samples:
            missing = sorted(set(sample.frame_keys) - frame_keys)
            if missing or sample.key in sample_keys or sample.key in frame_keys:
                raise SchemaError("write_shard", f"sample {sample.key}", "a new key whose frames were written "
                                  "earlier in this shard", f"missing frames {missing}" if missing else "a used key")
            sample_keys.add(sample.key)
            num_tokens += sample.length
            for name, data in encode_sample(sample, compressor):
                _add_member(tar, name, data)
    return ShardInfo(out.num_bytes, out.sha256.hexdigest(), len(frame_keys), len(sample_keys), num_tokens)


def write_shard(url: str, frames: Iterable[CompactFrame | PackedFrame], samples: Iterable[StoredSample],
                zstd_level: int = DEFAULT_ZSTD_LEVEL) -> ShardInfo:
    """Write a shard to a local path or fsspec URL atomically: a temporary `.<name>.*.tmp`, then rename/upload."""
    fs, path = url_to_fs(url)
    local = isinstance(fs, LocalFileSystem)
    if local:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    prefix = "." + os.path.basename(path) + "."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=os.path.dirname(path) if local else None)
    try:
        with os.fdopen(fd, "wb") as f:
            info = write_shard_stream(f, frames, samples, zstd_level)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        if local:
            os.replace(tmp, path)
        else:
            fs.put_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.debug("wrote %s: %d frames, %d samples, %d bytes", url, info.frames, info.samples, info.bytes)
    return info


# ---------------------------------------------------------------- reading: tar level
class _HeaderProblem(Exception):
    def __init__(self, member: str | None, expected: str, found: str):
        super().__init__(member, expected, found)


class _StrictTarInfo(tarfile.TarInfo):
    """TarInfo that refuses what a shard never contains, before tarfile reads any member data.

    tarfile itself stops silently at a truncated or corrupt header after the first member, and reads
    the data of pax/GNU extension headers of any declared size; both are errors here.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:
            raise  # a zero block: the regular end-of-archive marker
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError) as e:
            raise _HeaderProblem(None, "another tar header or the end-of-archive marker", f"end of data ({e})") from e
        except tarfile.InvalidHeaderError as e:
            raise _HeaderProblem(None, "a valid tar header", f"a corrupt header ({e})") from e

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type != tarfile.REGTYPE:
            raise _HeaderProblem(self.name, "a regular file member", f"tar member type {self.type!r}")
        if not 0 <= self.size <= MAX_MEMBER_BYTES:
            raise _HeaderProblem(self.name, f"at most {MAX_MEMBER_BYTES} bytes", f"declared size {self.size}")
        return super()._proc_member(tarfile_)


def _regular_file(fileobj: BinaryIO) -> bool:
    """True for a file on a local disk (random access is cheap); False for pipes, sockets and remote streams."""
    try:
        return stat.S_ISREG(os.fstat(fileobj.fileno()).st_mode) and fileobj.seekable()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


def _iter_members(fileobj: BinaryIO, url: str, max_length: int) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, data) of each member, in archive order, after checking its header."""
    caps = member_caps(max_length)
    last = "(start of archive)"
    try:
        # a local file with tarfile's random-access reader (2× faster member reads); pipes and remote as a stream
        mode = "r:" if _regular_file(fileobj) else "r|"
        with tarfile.open(fileobj=fileobj, mode=mode, tarinfo=_StrictTarInfo,  # type: ignore[call-overload]
                          bufsize=_READ_BUFFER_BYTES) as tar:
            for info in tar:
                last = info.name
                key, _, ext = info.name.partition(".")
                if not KEY_PATTERN.fullmatch(key):
                    raise ShardError(url, info.name, "a member name <key>.<ext> with key [A-Za-z0-9_-]{1,80}",
                                     "an unsafe or malformed name")
                if ext not in caps:
                    raise ShardError(url, info.name, f"an extension in {sorted(caps)}", repr(ext))
                if info.size > caps[ext]:
                    raise ShardError(url, info.name, f"at most {caps[ext]} bytes for .{ext}",
                                     f"declared size {info.size} (refused before reading)")
                yield key, ext, tar.extractfile(info).read()  # type: ignore[union-attr]
    except _HeaderProblem as e:
        member, expected, found = e.args
        raise ShardError(url, member or f"(header after {last})", expected, found) from e
    except tarfile.TarError as e:
        raise ShardError(url, last, "a complete tar archive", f"{e} (truncated or corrupt shard)") from e


# ---------------------------------------------------------------- reading: records
class _RecordAssembler:
    """Turns the member sequence into frames and samples, enforcing the layout:
    frames first (frame.json, rgb.zst), then samples (sample.json, tokens.npy.zst[, vggt.npy.zst])."""

    def __init__(self, url: str, max_length: int):
        self.url, self.max_length = url, max_length
        self.frame_keys: set[str] = set()
        self.seen_keys: set[str] = set()
        self.num_samples = 0
        self.pending: dict | None = None  # the sample being assembled

    def feed(self, key: str, ext: str, data: bytes) -> Iterator[PackedFrame | StoredSample]:
        ref = MemberRef(self.url, f"{key}.{ext}")
        if ext in (FRAME_EXTS[0], SAMPLE_EXTS[0]):
            yield from self.finish()
            if key in self.seen_keys:
                raise ref.error("each key once per shard", "a key used earlier in this shard")
            self.seen_keys.add(key)
            self.pending = {"kind": ext, "key": key, "exts": [ext], "ref": ref}
            if ext == FRAME_EXTS[0]:
                if self.num_samples:
                    raise ref.error("all frames before the first sample", "a frame after samples")
                self.pending["geometry"] = decode_frame_header(data, ref)
            else:
                self.pending["header"] = self._sample_header(data, ref)
            return
        layout = FRAME_EXTS if self.pending and self.pending["kind"] == FRAME_EXTS[0] else SAMPLE_EXTS
        pending = self.pending
        if pending is None or pending["key"] != key or ext != layout[len(pending["exts"])]:
            after = f"after {pending['ref'].name}" if pending else "at the start of a record"
            raise ref.error(f"members in the order {FRAME_EXTS} or {SAMPLE_EXTS}", f"this member {after}")
        pending["exts"].append(ext)
        if ext == "rgb.zst":
            self.pending = None
            self.frame_keys.add(key)
            yield PackedFrame(key, pending["geometry"], data, ref)
        elif ext == "tokens.npy.zst":
            pending["tokens"] = decode_tokens(data, ref, pending["header"]["length"])
        else:
            pending["vggt"] = decode_vggt(data, ref)
            yield from self.finish()

    def _sample_header(self, data: bytes, ref: MemberRef) -> dict:
        header = decode_sample_header(data, ref, self.max_length)
        missing = sorted(set(header["frame_keys"]) - self.frame_keys)
        if missing:
            raise ref.error("frame_keys of frames stored earlier in this shard", f"missing frames {missing}")
        return header

    def finish(self) -> Iterator[StoredSample]:
        """Complete the pending record (at the next record or at the end of the archive)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        layout = FRAME_EXTS if pending["kind"] == FRAME_EXTS[0] else SAMPLE_EXTS[:2]
        if len(pending["exts"]) < len(layout):
            wanted = f"{pending['key']}.{layout[len(pending['exts'])]}"
            raise ShardError(self.url, pending["ref"].name, f"member {wanted} next", "the next record or the end")
        header = pending["header"]
        self.num_samples += 1
        yield StoredSample(pending["key"], header["sample_id"], header["episode"], tuple(header["frame_keys"]),
                           header["action_label"], pending["tokens"], pending.get("vggt"))


def iter_shard_stream(fileobj: BinaryIO, url: str, *, lazy_frames: bool = False,
                      max_length: int = MAX_SEQUENCE_LENGTH) -> Iterator[Record]:
    """Records of one shard from any byte stream, in stored order: frames, then samples.

    Frames come as CompactFrame, or as PackedFrame (still compressed; decoded and checked by `unpack()`)
    with `lazy_frames`. An archive without members yields nothing; deciding that an empty shard is
    wrong is the caller's job. `url` is only used in error messages.
    """
    assembler = _RecordAssembler(url, max_length)
    for key, ext, data in _iter_members(fileobj, url, max_length):
        for record in assembler.feed(key, ext, data):
            yield record if lazy_frames or not isinstance(record, PackedFrame) else record.unpack()
    yield from assembler.finish()


def iter_shard(url: str, *, lazy_frames: bool = False, max_length: int = MAX_SEQUENCE_LENGTH) -> Iterator[Record]:
    """`iter_shard_stream` over a local path or fsspec URL (`file://`, `memory://`, object stores)."""
    with open_url(url) as f:
        yield from iter_shard_stream(f, url, lazy_frames=lazy_frames, max_length=max_length)


def read_shard(url: str, *, max_length: int = MAX_SEQUENCE_LENGTH) -> ShardContents:
    """A whole shard, decoded and validated."""
    contents = ShardContents()
    for record in iter_shard(url, max_length=max_length):
        if isinstance(record, StoredSample):
            contents.samples.append(record)
        else:
            contents.frames[record.key] = record  # type: ignore[assignment]
    return contents


def open_url(url: str, mode: str = "rb") -> fsspec.core.OpenFile:
    """An fsspec OpenFile (use as a context manager) for a local path or URL."""
    return fsspec.open(url, mode)


def sha256_of(url: str, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, streamed."""
    digest = hashlib.sha256()
    with open_url(url) as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def list_names(fs, folder: str) -> list[str]:
    """The names (not paths) of the entries of `folder` on filesystem `fs`."""
    return [path.rstrip("/").rsplit("/", 1)[-1] for path in fs.ls(folder, detail=False)]

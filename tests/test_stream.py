"""ShardStream: rank × worker coverage under the drop-the-tail policy, determinism, mixing, exact resume
(fresh process, persistent workers), sources (manifest, brace pattern, pipe:), corruption and build-parameter refusal."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from schemas.errors import SchemaError
from schemas.manifest import Manifest, ShardRecord, Totals, VggtTags, write_manifest
from schemas.sample import CompactFrame, EncodedText
from schemas.stored import ShardError, StoredSample
from shards_manifest.shard_io import read_shard, write_shard
from train.collate import STREAM_KEY, Collator
from train.shard_policy import (MIX_POLICIES, assign_pieces, epoch_shard_order, rank_samples, skip_consumed,
                                slot_sizes)
from train.stream import Position, ShardStream, StreamConfig, check_manifest_compat, slot_samples

REPO = Path(__file__).resolve().parents[1]
COUNTS = (9, 5, 14, 1, 11, 7, 13, 3, 8, 6)  # samples per shard: 77 in all, deliberately uneven
WORLD_SIZES, WORKERS = (1, 2, 3, 8), (0, 1, 2, 4)
TOKENIZER_HASH = "ab" * 32


def _frame(rng: np.random.Generator, key: str) -> CompactFrame:
    h, w = int(rng.integers(3, 9)), int(rng.integers(3, 9))
    return CompactFrame(key, rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 28, 28, 28 - h, 0)  # 1 image token


def _sample(rng: np.random.Generator, key: str, frame_keys: tuple[str, ...], with_vggt: bool) -> StoredSample:
    images = [[151652, 151655, 151653] for _ in frame_keys]  # vision_start, image_pad, vision_end per image
    ids = np.concatenate([rng.integers(0, 1000, 2)] + images + [rng.integers(0, 1000, int(rng.integers(2, 9)))])
    length = len(ids)
    labels = np.where(np.arange(length) >= length - 2, ids, -100)
    segments = np.where(labels != -100, 4, 0)
    positions = np.tile(np.arange(length), (3, 1))
    vggt = rng.standard_normal((4, 2048)).astype(np.float16) if with_vggt else None
    return StoredSample(key, f"ep/{key}", "ep", frame_keys, int(rng.integers(0, 4)),
                        EncodedText(ids, labels, segments, positions), vggt)


def build_shards(folder: Path, counts=COUNTS, seed: int = 0, with_vggt: bool = False) -> list[str]:
    """Tiny shards written with shard_io's writer: random frames, each sample using 1–3 of its shard's frames."""
    rng = np.random.default_rng(seed)
    urls = []
    for s, count in enumerate(counts):
        frames = [_frame(rng, f"f{s}-{i}") for i in range(3)]
        samples = [_sample(rng, f"s{s}-{i}", tuple(f"f{s}-{int(j)}" for j in rng.integers(0, 3, rng.integers(1, 4))),
                           with_vggt) for i in range(count)]
        url = str(folder / f"shard-{s:06d}.tar")
        write_shard(url, frames, samples)
        urls.append(url)
    return urls


def write_test_manifest(folder: Path, urls: list[str], **changes) -> str:
    shards = []
    for url in urls:
        contents = read_shard(url)
        data = Path(url).read_bytes()
        shards.append(ShardRecord(Path(url).name, 1, len(contents.samples), len(contents.frames), len(data),
                                  hashlib.sha256(data).hexdigest(), sum(s.length for s in contents.samples), 0))
    totals = Totals(len(shards), sum(s.samples for s in shards), sum(s.frames for s in shards),
                    sum(s.bytes for s in shards), sum(s.text_tokens for s in shards), 0, 0)
    fields = dict(schema_version=1, created_by="tests", build_config={}, build_config_hash="0" * 64,
                  tokenizer_hash=TOKENIZER_HASH, processor_hash="cd" * 32, image_mode="pad", max_history_images=8,
                  vggt=None, shards=tuple(shards), totals=totals, rejects_by_reason={})
    fields.update(changes)
    url = str(folder / "manifest.json")
    write_manifest(url, Manifest(**fields))
    return url


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return build_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def stored_ids(shards) -> list[list[str]]:
    """Independent reference: each shard's sample ids in stored order, read with shard_io directly."""
    return [[s.sample_id for s in read_shard(url).samples] for url in shards]


@pytest.fixture(scope="module")
def manifest(shards, tmp_path_factory) -> str:
    return write_test_manifest(Path(shards[0]).parent, shards)


def _expected_epoch(stored_ids, seed: int, epoch: int, world_size: int, num_slots: int, batch_size: int = 1):
    """(seen, dropped) sample ids of one epoch by the documented policy, from the shard order alone."""
    sequence = [sid for shard in epoch_shard_order(len(stored_ids), seed, epoch) for sid in stored_ids[shard]]
    keep = world_size * rank_samples(len(sequence), world_size, num_slots, batch_size)
    return sequence[:keep], sequence[keep:]


# ---------------------------------------------------------------- policies
@pytest.mark.parametrize("mix", sorted(MIX_POLICIES))
def test_mix_schedule_is_an_interleave_with_bounded_open_pieces(mix):
    lengths = [5, 0, 3, 9, 1, 4]
    for num_open in (1, 2, 4):
        schedule = MIX_POLICIES[mix](lengths, num_open, np.random.default_rng(7))
        assert np.bincount(schedule, minlength=len(lengths)).tolist() == lengths
        first = {p: int(np.argmax(schedule == p)) for p in set(schedule.tolist())}
        last = {p: len(schedule) - 1 - int(np.argmax(schedule[::-1] == p)) for p in first}
        ranked = sorted(first)  # non-empty pieces in order: the r-th opens after r - num_open + 1 have finished
        assert all(sum(last[q] < first[p] for q in ranked[:r]) >= r - num_open + 1 for r, p in enumerate(ranked))
        most_open = max(sum(first[p] <= t <= last[p] for p in first) for t in range(len(schedule)))
        assert most_open <= (num_open if mix == "interleave" else 1)
    if mix == "interleave":
        assert MIX_POLICIES[mix](lengths, 3, np.random.default_rng(7)).tolist() != sorted(schedule.tolist())


def test_skip_consumed_moves_starts_without_reading():
    pieces = assign_pieces(COUNTS, seed=3, epoch=1, rank=0, world_size=1, slot=0, num_slots=1)
    schedule = MIX_POLICIES["interleave"]([len(p) for p in pieces], 3, np.random.default_rng(0))
    left, rest = skip_consumed(pieces, schedule, 10)
    taken = Counter(schedule[:10].tolist())
    assert [p.start - q.start for p, q in zip(left, pieces)] == [taken[i] for i in range(len(pieces))]
    assert rest.tolist() == schedule[10:].tolist()


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("num_workers", WORKERS)
@pytest.mark.parametrize("batch_size", (1, 2))
def test_coverage_rank_by_worker(manifest, stored_ids, world_size, num_workers, batch_size):
    """One epoch over all (rank, worker): each kept sample exactly once, the documented tail dropped, equal batches."""
    config = StreamConfig(seed=11, batch_size=batch_size, num_workers=num_workers if batch_size > 1 else None)
    num_slots = max(1, num_workers)
    seen, batches_per_rank = [], []
    for rank in range(world_size):
        stream = ShardStream(manifest, config, rank=rank, world_size=world_size)
        per_slot = [[s["sample_id"] for s in slot_samples(stream.urls, stream.counts, config,
                                                          Position(2, rank, world_size, slot, num_slots))]
                    for slot in range(num_slots)]
        assert sum(map(len, per_slot)) == len(stream)
        assert [len(p) for p in per_slot] == slot_sizes(len(stream), num_slots)
        batches_per_rank.append(sum(-(-len(p) // 3) for p in per_slot))
        assert batches_per_rank[-1] == stream.num_batches(3, num_workers)
        seen += [sid for p in per_slot for sid in p]
    kept, dropped = _expected_epoch(stored_ids, 11, 2, world_size, num_slots, batch_size)
    assert Counter(seen) == Counter(kept) and len(seen) == len(set(seen))
    assert not set(seen) & set(dropped)
    assert len(dropped) < world_size * (num_slots * batch_size if batch_size > 1 else 1)
    assert len(set(batches_per_rank)) == 1


def test_real_dataloader_two_workers_two_ranks(shards, stored_ids):
    seen, num_batches = [], []
    for rank in range(2):
        stream = ShardStream(shards, StreamConfig(seed=5), rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2, collate_fn=Collator())
        batches = list(loader)
        num_batches.append(len(batches))
        assert len(batches) == stream.num_batches(4, 2)
        for batch in batches:
            assert len(set(batch[STREAM_KEY][:, 1].tolist())) == 1  # a batch comes from one worker
            seen += batch["sample_id"]
    kept, _ = _expected_epoch(stored_ids, 5, 0, 2, 2)
    assert Counter(seen) == Counter(kept) and num_batches[0] == num_batches[1]


# ---------------------------------------------------------------- determinism, epochs
def _ids(stream: ShardStream, epoch: int) -> list[str]:
    stream.set_epoch(epoch)
    return [s["sample_id"] for s in stream]


def test_same_seed_and_epoch_same_order_other_epoch_or_seed_differs(shards):
    a, b = ShardStream(shards, StreamConfig(seed=1)), ShardStream(shards, StreamConfig(seed=1))
    first = _ids(a, 0)
    assert first == _ids(b, 0) == _ids(a, 0)
    assert sorted(first) == sorted(_ids(a, 1)) and first != _ids(a, 1)
    assert first != _ids(ShardStream(shards, StreamConfig(seed=2)), 0)
    episodes = [sid.split("-")[0] for sid in first[:12]]  # several shards interleaved near the start
    assert len(set(episodes)) >= 2


def test_persistent_workers_see_set_epoch(shards):
    stream = ShardStream(shards, StreamConfig(seed=4))
    loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=2, persistent_workers=True,
                                         collate_fn=Collator())
    by_epoch = {}
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        batches = list(loader)
        assert {e for b in batches for e in b[STREAM_KEY][:, 0].tolist()} == {epoch}
        by_epoch[epoch] = [sid for b in batches for sid in b["sample_id"]]
    assert by_epoch[0] != by_epoch[1] and sorted(by_epoch[0]) == sorted(by_epoch[1])


def test_resume_inside_a_slot_equals_the_tail(shards):
    config = StreamConfig(seed=9, num_open_shards=2)
    position = Position(0, 1, 2, 1, 2)
    full = [s["sample_id"] for s in slot_samples(shards, COUNTS, config, position)]
    for start in (0, 1, 4, len(full) - 1, len(full)):
        tail = [(s["sample_id"], s[STREAM_KEY][3]) for s in slot_samples(shards, COUNTS, config, position, start)]
        assert tail == list(zip(full[start:], range(start, len(full))))


# ---------------------------------------------------------------- resume
_RESUME_CHILD = """
import json, sys, torch
from train.collate import Collator
from train.stream import ShardStream, StreamConfig
source, state_path, out_path = sys.argv[1:4]
stream = ShardStream(source, StreamConfig(seed=3), rank=1, world_size=2)
stream.load_state_dict(json.load(open(state_path)))
loader = torch.utils.data.DataLoader(stream, batch_size=3, num_workers=2, persistent_workers=True,
                                     collate_fn=Collator())
rest = list(loader)
stream.set_epoch(1)
torch.save({"rest": rest, "next_epoch": list(loader)}, out_path)
"""


def _loader(stream: ShardStream, num_workers: int = 2):
    return torch.utils.data.DataLoader(stream, batch_size=3, num_workers=num_workers,
                                       persistent_workers=num_workers > 0, collate_fn=Collator())


def _worker_error(loader) -> str:
    """The message of the error a loader worker raised. Kept as text only: a live traceback would keep the
    loader's iterator (and its worker processes) alive until interpreter exit, where each join waits 5 s."""
    try:
        list(loader)
    except RuntimeError as e:  # the DataLoader re-raises a worker's exception type only if it takes one argument
        return str(e)
    raise AssertionError("expected the loader to raise")


def _assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys() and g["sample_id"] == w["sample_id"]
        for key, value in w.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(g[key], value), key


def test_resume_in_a_fresh_process_continues_exactly(manifest, tmp_path):
    """k batches with 2 persistent workers, save, new process + loader, load: the rest of the epoch and the next epoch match."""
    reference = ShardStream(manifest, StreamConfig(seed=3), rank=1, world_size=2)
    ref_loader = _loader(reference)
    epoch0 = list(ref_loader)
    reference.set_epoch(1)
    epoch1 = list(ref_loader)
    assert len(epoch0) == reference.num_batches(3, 2) == 14
    k = 5  # odd: the resumed loader's worker 0 must play the slot whose turn it is
    stream = ShardStream(manifest, StreamConfig(seed=3), rank=1, world_size=2)
    iterator = iter(_loader(stream))
    for _ in range(k):
        stream.observe(next(iterator))  # the loader has prefetched more; those must not count
    state = stream.state_dict()
    assert sum(state["consumed"]) == sum(len(b["sample_id"]) for b in epoch0[:k]) and state["next_slot"] == 1
    del iterator
    (tmp_path / "state.json").write_text(json.dumps(state))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", _RESUME_CHILD, manifest, str(tmp_path / "state.json"),
                    str(tmp_path / "out.pt")], check=True, cwd=REPO, env=env, timeout=120)
    out = torch.load(tmp_path / "out.pt", weights_only=False)
    _assert_same_batches(out["rest"], epoch0[k:])
    _assert_same_batches(out["next_epoch"], epoch1)


def test_resume_without_workers_and_refusals(manifest):
    full = list(_loader(ShardStream(manifest, StreamConfig(seed=3)), num_workers=0))
    stream = ShardStream(manifest, StreamConfig(seed=3))
    for batch, _ in zip(_loader(stream, 0), range(4)):
        stream.observe(batch)
    state = pickle.loads(pickle.dumps(stream.state_dict()))
    resumed = ShardStream(manifest, StreamConfig(seed=3))
    resumed.load_state_dict(state)
    _assert_same_batches(list(_loader(resumed, 0)), full[4:])
    resumed.load_state_dict(state)
    error = _worker_error(_loader(resumed, 2))
    assert "dataloader_num_workers" in error and "expected 0 or 1 (as when the state was saved), found 2" in error
    with pytest.raises(SchemaError, match="seed"):
        ShardStream(manifest, StreamConfig(seed=4)).load_state_dict(state)
    with pytest.raises(SchemaError, match="world_size"):
        ShardStream(manifest, StreamConfig(seed=3), rank=0, world_size=2).load_state_dict(state)
    # the sample order depends on these too: replaying the counts against another order would repeat and skip
    with pytest.raises(SchemaError, match="num_open_shards"):
        ShardStream(manifest, StreamConfig(seed=3, num_open_shards=2)).load_state_dict(state)
    with pytest.raises(SchemaError, match="mix"):
        ShardStream(manifest, StreamConfig(seed=3, mix="sequential")).load_state_dict(state)


# ---------------------------------------------------------------- sources
def test_manifest_brace_pattern_and_pipe_sources_agree(shards, manifest):
    config = StreamConfig(seed=8)
    want = _ids(ShardStream(shards, config), 0)
    pattern = str(Path(shards[0]).parent / f"shard-{{000000..{len(shards) - 1:06d}}}.tar")
    assert _ids(ShardStream(pattern, config), 0) == want
    assert _ids(ShardStream(manifest, config), 0) == want
    assert _ids(ShardStream(str(Path(manifest).parent), config), 0) == want  # the build folder
    assert _ids(ShardStream([f"pipe:cat {u}" for u in shards], config), 0) == want
    assert ShardStream(manifest, config).counts == list(COUNTS)


def test_manifest_with_other_build_parameters_is_refused(shards, tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    tags = VggtTags("ef" * 32, "last", "bfloat16")
    url = write_test_manifest(folder, shards, image_mode="crop", vggt=tags)
    ok = {"tokenizer_hash": TOKENIZER_HASH, "max_history_images": 8}
    ShardStream(url, StreamConfig(), expected=ok)  # matching fields pass
    with pytest.raises(SchemaError) as error:
        ShardStream(url, StreamConfig(), expected={**ok, "image_mode": "pad", "vggt": None})
    assert "image_mode" in str(error.value) and "vggt" in str(error.value) and "tokenizer_hash" not in str(error.value)
    from schemas.manifest import read_manifest
    manifest = read_manifest(url)
    check_manifest_compat(manifest, {"vggt": tags, "vggt.reference_frame": "last"})
    with pytest.raises(SchemaError, match="vggt.dtype.*float16"):
        check_manifest_compat(manifest, {"vggt.dtype": "float16"})
    with pytest.raises(SchemaError, match="max_history_images"):
        check_manifest_compat(manifest, {"max_history_images": 4})


# ---------------------------------------------------------------- corruption
def _flip_byte(path: Path, member_suffix: str, stored: list[StoredSample]) -> str:
    """Flip one byte in the middle of the data of a member that some sample uses; returns the member name."""
    with tarfile.open(path) as tar:
        names = {m.name: m for m in tar.getmembers()}
    key = stored[0].frame_keys[0] if member_suffix == "rgb.zst" else stored[0].key
    member = names[f"{key}.{member_suffix}"]
    data = bytearray(path.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0x5A
    path.write_bytes(bytes(data))
    return member.name


@pytest.mark.parametrize("member_suffix", ["tokens.npy.zst", "rgb.zst"])
def test_flipped_byte_raises_naming_shard_and_member(shards, tmp_path, member_suffix):
    folder = tmp_path / "bad"
    copies = build_shards(folder)
    manifest = write_test_manifest(folder, copies)
    bad = Path(copies[2])
    name = _flip_byte(bad, member_suffix, read_shard(str(bad)).samples)
    stream = ShardStream(manifest, StreamConfig(seed=0))
    with pytest.raises(ShardError) as error:
        list(stream)
    assert str(bad) in str(error.value) and name in str(error.value)
    loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=2, collate_fn=Collator())
    message = _worker_error(loader)  # through a loader worker: re-raised with the original message
    assert str(bad) in message and name in message and "ShardError" in message
    with pytest.raises(ShardError, match=name):  # bare URLs: counting at construction already reads the member
        list(ShardStream(copies, StreamConfig(seed=0)))


def test_sample_count_differing_from_manifest_raises(shards, tmp_path):
    folder = tmp_path / "short"
    copies = build_shards(folder)
    manifest = write_test_manifest(folder, copies)
    build_shards(folder, counts=(COUNTS[0] - 1, *COUNTS[1:]))  # shard 0 rewritten with one sample less
    with pytest.raises(ShardError, match=r"shard-000000\.tar.*9 samples"):
        list(ShardStream(manifest, StreamConfig(seed=0)))


# ---------------------------------------------------------------- equivalence with the online path
@pytest.mark.slow
@pytest.mark.parametrize("which", ["embedded", "original_fixtures"])
def test_shard_path_equals_online_path(which, tmp_path, shared_dir):
    """prep.build → ShardStream → Collator → PixelDecoder equals OnlineDataset → Collator → PixelDecoder, bit for bit."""
    from prep.build import build, parse_args
    from prep.sample_data import ensure_sample_episodes, ensure_tokenizer
    from train.online import OnlineDataset
    from train.pixels import PixelDecoder

    if which == "embedded":
        source, tokenizer = str(ensure_sample_episodes()), str(ensure_tokenizer())
    else:
        source = str(shared_dir / "fixtures/original/episodes")
        tokenizer = str(shared_dir / "fixtures/original/tokenizer")
    build(parse_args(["--input", source, "--model-path", tokenizer, "--output", str(tmp_path / "out"),
                      "--no-progress", "--max-reject-fraction", "0.5"]))
    online = OnlineDataset(source, tokenizer)
    position = {record.sample_id: i for i, record in enumerate(online.samples)}
    streamed = list(ShardStream(str(tmp_path / "out/manifest.json"), StreamConfig(seed=0)))
    assert sorted(s["sample_id"] for s in streamed) == sorted(position)
    reference = {sid: online[i] for sid, i in position.items()}
    decode, collate = PixelDecoder(), Collator()
    for batch_size in (1, 3):
        for i in range(0, len(streamed) - batch_size + 1, batch_size):
            chunk = streamed[i:i + batch_size]
            got = decode(collate(chunk))
            want = decode(collate([reference[s["sample_id"]] for s in chunk]))
            assert got.keys() - {STREAM_KEY} == want.keys() and got["sample_id"] == want["sample_id"]
            for key in want.keys() - {"sample_id", "images_vggt"}:
                assert want[key].dtype == got[key].dtype and torch.equal(want[key], got[key]), key
            assert all(torch.equal(a, b) for a, b in zip(got["images_vggt"], want["images_vggt"], strict=True))

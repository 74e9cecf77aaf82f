"""Runs shard tasks on Ray — the only module that imports Ray.

One task writes one shard and returns a small record, so the driver never holds data; tasks are
retried if a worker dies (their output is idempotent); at most `max_in_flight` tasks are queued.
With a VGGT checkpoint each finished shard goes to one of a fixed set of feature actors (one per GPU,
`num_gpus=1`; a single CPU actor on a cluster without GPUs) while later CPU tasks keep running.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from collections.abc import Iterator

from prep.plan import ShardTask
from prep.shard_task import ShardResult, run_task
from schemas.config import BuildConfig
from shards_manifest import shard_io

log = logging.getLogger(__name__)
MAX_RETRIES = 3


def execute_on_ray(tasks: list[ShardTask], config: BuildConfig, checkpoint_sha256: str = "") -> Iterator[ShardResult]:
    """Yield each task's result as it finishes (completion order); with `checkpoint_sha256`, after its features."""
    import ray

    address = config.ray_address or os.environ.get("RAY_ADDRESS") or None
    started_here = not ray.is_initialized()
    if started_here:
        kwargs = {"address": address} if address else {"num_cpus": config.num_cpus or None, "include_dashboard": False}
        ray.init(logging_level=logging.WARNING, log_to_driver=False, **kwargs)
    try:
        check_nodes_see_paths(ray, config)
        yield from _Scheduler(ray, tasks, config, checkpoint_sha256).run()
    finally:
        if started_here:
            ray.shutdown()


def check_nodes_see_paths(ray, config: BuildConfig) -> None:
    """Before any task: one probe per alive node checks that the node sees the input, the tokenizer folder and the
    output folder as the driver does (a marker file the driver just wrote there), and, on GPU nodes, the VGGT
    checkpoint. On a multi-node cluster these must be shared storage; a node without them fails here, named, rather
    than every task failing later on that node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    fs, root = shard_io.url_to_fs(config.output)
    name = f".node-probe-{uuid.uuid4().hex}"  # a dot-file, like a shard being written: no reader lists it
    fs.pipe_file(f"{root.rstrip('/')}/{name}", b"")
    output = {"output folder": f"{config.output.rstrip('/')}/{name}"}
    local = {"input": config.input, "tokenizer folder (--model-path)": config.model_path}
    nodes = [node for node in ray.nodes() if node["Alive"]]
    any_gpu = any(node["Resources"].get("GPU", 0) for node in nodes)
    probe = ray.remote(num_cpus=0)(probe_paths)
    refs = {}
    for node in nodes:
        paths = dict(local)
        if config.vggt_model and (node["Resources"].get("GPU", 0) or not any_gpu):
            paths["VGGT checkpoint (--vggt-model)"] = config.vggt_model
        strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        refs[node["NodeManagerAddress"]] = probe.options(scheduling_strategy=strategy).remote(paths, output)
    try:
        problems = [f"node {address}: {problem}" for address, ref in refs.items() for problem in ray.get(ref)]
    finally:
        fs.rm(f"{root.rstrip('/')}/{name}")
    if problems:
        raise FileNotFoundError(f"{len(problems)} path problem(s) on the Ray cluster ({len(nodes)} nodes); input, "
                                "tokenizer, output and checkpoint must be the same path on every node (shared storage "
                                "such as NFS, or an fsspec URL like s3:// for the output):\n  " + "\n  ".join(problems))
    log.info("all %d Ray node(s) see the input, tokenizer and output", len(nodes))


def probe_paths(local: dict[str, str], urls: dict[str, str]) -> list[str]:
    """What this process cannot see: `local` are filesystem paths, `urls` fsspec URLs of files that must exist."""
    problems = [f"{what} {path} does not exist here" for what, path in local.items()
                if path and not os.path.exists(path)]
    for what, url in urls.items():
        fs, path = shard_io.url_to_fs(url)
        if not fs.exists(path):
            problems.append(f"{what}: cannot see {url}, a file the build driver just wrote there")
    return problems


class _Scheduler:
    """CPU shard tasks and feature-actor calls in flight together, collected by one `ray.wait` over both."""

    def __init__(self, ray, tasks: list[ShardTask], config: BuildConfig, checkpoint_sha256: str):
        self.ray, self.config, self.checkpoint_sha256 = ray, config, checkpoint_sha256
        self.queue = list(reversed(tasks))
        self.remote_task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(run_task)
        self.max_in_flight = config.max_in_flight or 2 * int(ray.cluster_resources().get("CPU", 1))
        self.config_ref = ray.put(config)
        self.pending: dict = {}  # object ref → the feature actor computing it, or None for a shard task
        self.waiting: list[ShardResult] = []  # finished shards that still need features
        self.actors: list = []
        self.idle: list = []  # feature actors with no call in flight

    def run(self) -> Iterator[ShardResult]:
        while self.queue or self.pending or self.waiting:
            self._submit()
            done, _ = self.ray.wait(list(self.pending), num_returns=1)
            actor = self.pending.pop(done[0])
            result = self.ray.get(done[0])
            if actor is not None:
                self.idle.append(actor)
            if actor is None and self._needs_features(result):
                self.waiting.append(result)
            elif actor is None and self.checkpoint_sha256 and result.samples:
                yield dataclasses.replace(result, vggt_skipped=True)  # already holds this checkpoint's features
            else:
                yield result

    def _needs_features(self, result: ShardResult) -> bool:
        if not self.checkpoint_sha256:
            return False
        from prep.vggt_stage import needs_features
        return needs_features(result, self.checkpoint_sha256)

    def _submit(self) -> None:
        num_tasks = sum(actor is None for actor in self.pending.values())
        while self.queue and num_tasks < self.max_in_flight:
            self.pending[self.remote_task.remote(self.queue.pop(), self.config_ref)] = None
            num_tasks += 1
        if self.waiting and not self.actors:
            self._start_actors()
        while self.waiting and self.idle:
            actor = self.idle.pop()
            self.pending[actor.process.remote(self.waiting.pop(0))] = actor

    def _start_actors(self) -> None:
        """Started when the first shard needs features, so a re-run of a finished build loads no model."""
        from prep.vggt_stage import FeatureStage, warn_if_slow

        num_gpus = int(self.ray.cluster_resources().get("GPU", 0))
        if not num_gpus:
            warn_if_slow(self.config, has_gpu=False)
        options = {"num_gpus": 1, "num_cpus": 1} if num_gpus else {"num_gpus": 0, "num_cpus": 0}
        actor_class = self.ray.remote(max_restarts=1, max_task_retries=MAX_RETRIES, **options)(FeatureStage)
        self.actors = [actor_class.remote(self.config, self.checkpoint_sha256) for _ in range(max(num_gpus, 1))]
        self.idle = list(self.actors)
        log.info("started %d VGGT feature actor(s) (%s)", len(self.actors), "1 GPU each" if num_gpus else "CPU")

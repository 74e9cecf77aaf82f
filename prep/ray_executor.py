"""Runs shard tasks on Ray — the only module that imports Ray.

One task writes one shard and returns a small record, so the driver never holds data; tasks are
retried if a worker dies (their output is idempotent); at most `max_in_flight` tasks are queued.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator

from prep.plan import ShardTask
from prep.shard_task import ShardResult, run_task
from schemas.config import BuildConfig

log = logging.getLogger(__name__)
MAX_RETRIES = 3


def execute_on_ray(tasks: list[ShardTask], config: BuildConfig) -> Iterator[ShardResult]:
    """Yield each task's result as it finishes (completion order)."""
    import ray

    address = config.ray_address or os.environ.get("RAY_ADDRESS") or None
    started_here = not ray.is_initialized()
    if started_here:
        kwargs = {"address": address} if address else {"num_cpus": config.num_cpus or None, "include_dashboard": False}
        ray.init(logging_level=logging.WARNING, log_to_driver=False, **kwargs)
    try:
        remote_task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(run_task)
        max_in_flight = config.max_in_flight or 2 * int(ray.cluster_resources().get("CPU", 1))
        config_ref = ray.put(config)
        pending, queue = [], list(reversed(tasks))
        while queue or pending:
            while queue and len(pending) < max_in_flight:
                pending.append(remote_task.remote(queue.pop(), config_ref))
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        if started_here:
            ray.shutdown()

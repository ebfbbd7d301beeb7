"""Sharded Hutchinson analysis: the probe passes in local worker processes or on a Ray cluster.

How the work splits
-------------------
The analysis is a sum over calibration batches (and, within a batch, over probes). The driver
(the process that runs ``lpcompile``) normalises the model, runs the reference pass (fp32 outputs,
activation ranges, the distortion loss) and then sends one task per calibration batch: the batch's
arrays, its padding masks and the probe numbers to draw there. A worker loads the model once, from
a path (the driver writes the normalised model there), recomputes the batch's reference outputs,
runs the batch's probe pass (:func:`lpcompile.analysis.sensitivity.batch_estimate`) and returns the
batch's diagonal sums, activation terms and per-probe trace samples. The driver adds them up in
batch order, exactly as the single-process run does, and predicts the losses.

Probe j on batch b is drawn from its own generator seeded from (seed, b, j) (``seeding="per-probe"``,
what ``auto`` picks whenever ``workers > 1`` or ``ray`` is set), so where a probe runs does not
change it: with the same seed, a sharded table equals the single-process per-probe table exactly
(each worker uses the driver's torch thread count, so its float reductions match too). Only the
probe passes are sharded; the reference pass (one forward per batch) and the prediction stay in
the driver. Memory: each worker holds the model and one batch's graph; the driver holds the model,
the reference outputs and one diagonal accumulator of the model's size, plus the results that
arrived ahead of their turn (at most about one per worker).

Local processes (``--workers N``)
---------------------------------
``concurrent.futures.ProcessPoolExecutor`` with the ``spawn`` start method; the normalised model is
written to a temporary folder (or ``--shard-dir``) and every worker reads it from there.

Ray (``--ray [ADDRESS]``; ``pip install 'lpcompile[ray]'``)
-----------------------------------------------------------
``--ray`` alone starts a local Ray instance for the run (or uses the one this process already
initialised with ``ray.init``, which it leaves running);
``--ray auto`` joins the cluster of this machine (``ray start --head`` ran here), and
``--ray ray://HEAD:10001`` (Ray Client) or ``--ray HEAD:6379`` joins a remote one. The work runs on
``--workers N`` Ray actors (when N is 1: one per CPU of the cluster, at most one per batch), each
one CPU (plus one GPU with ``--device cuda``); each actor loads the model once and takes batch
tasks in order (``ray.util.ActorPool``). The actors read the model from a path: on a
multi-machine cluster give ``--shard-dir`` a folder on a file system every node mounts (NFS,
a shared volume); a temporary folder only works when every actor runs on this machine. Every node
needs the same lpcompile, torch and onnx versions as the driver (a shared environment, or a Ray
``runtime_env``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import onnx_ir as ir
import torch

from lpcompile.analysis.config import AnalysisConfig
from lpcompile.analysis.sensitivity import BatchEstimate, BatchTask, OnnxAdapter, ProbeJob, batch_estimate
from lpcompile.errors import LpError, UsageError

logger = logging.getLogger(__name__)

__all__ = ["ShardPool", "ShardWorker", "WorkerSpec"]

MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its adapter (picklable).

    Attributes:
        model_path: the normalised model, readable by the worker.
        weights: the weight names to differentiate.
        act_tensors: the activation tensors to perturb.
        device: the torch device the worker runs on.
        threads: torch intra-op threads (the driver's, so float reductions match).
    """

    model_path: str
    weights: tuple[str, ...]
    act_tensors: tuple[str, ...]
    device: str
    threads: int


class ShardWorker:
    """One worker: the model loaded once, batch tasks run on it (a process-pool worker or a Ray actor)."""

    def __init__(self, spec: WorkerSpec) -> None:
        torch.set_num_threads(spec.threads)
        from lpcompile.frontend.onnx_io import materialize

        model = ir.load(spec.model_path)
        materialize(model)  # the interpreter reads initializers from memory
        self.adapter = OnnxAdapter(model, spec.weights, spec.act_tensors, device=spec.device)
        logger.debug("worker %d: loaded %s", os.getpid(), spec.model_path)

    def run(self, job: ProbeJob, task: BatchTask) -> BatchEstimate:
        ref, _ = self.adapter.reference(task.batch)
        return batch_estimate(self.adapter, task, ref, job)


# A worker process builds one ShardWorker in its initializer; the pool's tasks find it here. This
# lives only in the worker processes (the driver never sets it).
_WORKER: list[ShardWorker] = []


def _init_process(spec: WorkerSpec) -> None:
    _WORKER[:] = [ShardWorker(spec)]


def _run_in_process(job: ProbeJob, task: BatchTask) -> BatchEstimate:
    return _WORKER[0].run(job, task)


class ShardPool:
    """Runs :class:`BatchTask` s on local worker processes or Ray actors; a context manager.

    ``run`` has the :data:`lpcompile.analysis.sensitivity.BatchRunner` signature: it yields the
    estimates in task order, so the driver's sums are those of the single-process run.
    """

    def __init__(
        self, model: ir.Model, weights: Sequence[str], act_tensors: Sequence[str], config: AnalysisConfig, device: str
    ) -> None:
        if config.effective_seeding != "per-probe":
            raise UsageError("sharded analysis needs per-probe seeding")
        self.config = config
        self._tmp: str | None = None
        if config.shard_dir:
            folder = Path(config.shard_dir)
            folder.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix="lpcompile-shard-", dir=folder))
        else:
            folder = Path(tempfile.mkdtemp(prefix="lpcompile-shard-"))
        self._tmp = str(folder)
        path = folder / MODEL_FILE
        ir.save(model, path, external_data=f"{MODEL_FILE}.data")
        self.spec = WorkerSpec(
            model_path=str(path),
            weights=tuple(weights),
            act_tensors=tuple(act_tensors),
            device=device,
            threads=torch.get_num_threads(),
        )
        self._executor: ProcessPoolExecutor | None = None
        self._ray_pool: Any = None
        self._ray_actors: list[Any] = []
        self._ray_started = False  # this pool initialised Ray (and shuts it down)

    def __enter__(self) -> ShardPool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers and remove the model copy."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        if self._ray_pool is not None:
            import ray

            for actor in self._ray_actors:
                ray.kill(actor)
            self._ray_actors = []
            self._ray_pool = None
            if self._ray_started:
                ray.shutdown()
                self._ray_started = False
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def run(
        self, job: ProbeJob, tasks: Sequence[BatchTask], step: Callable[[int], None] | None
    ) -> Iterator[BatchEstimate]:
        """The estimates of ``tasks``, in order; ``step(k)`` after each batch of k probes."""
        results = self._ray_map(job, tasks) if self.config.ray is not None else self._local_map(job, tasks)
        for est in results:
            if step is not None:
                step(est.k)
            yield est

    # -- local processes ----------------------------------------------------------------------

    def _local_map(self, job: ProbeJob, tasks: Sequence[BatchTask]) -> Iterator[BatchEstimate]:
        if self._executor is None:
            workers = max(1, min(self.config.workers, len(tasks) or 1))
            self._executor = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_process,
                initargs=(self.spec,),
            )
            logger.info("analysis sharded over %d worker process(es)", workers)
        return self._executor.map(_run_in_process, [job] * len(tasks), tasks)

    # -- Ray ----------------------------------------------------------------------------------

    def _ray_map(self, job: ProbeJob, tasks: Sequence[BatchTask]) -> Iterator[BatchEstimate]:
        if self._ray_pool is None:
            self._start_ray(len(tasks))
        pool = self._ray_pool
        return pool.map(lambda actor, task: actor.run.remote(job, task), list(tasks))

    def _start_ray(self, ntasks: int) -> None:
        try:
            import ray
            from ray.util import ActorPool
        except ImportError:
            raise LpError("--ray needs Ray: pip install 'lpcompile[ray]'") from None
        address = self.config.ray
        if not ray.is_initialized():
            ray.init(address=None if address in (None, "", "local") else address, log_to_driver=False)
            self._ray_started = True
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        count = max(1, min(self.config.workers if self.config.workers > 1 else cpus, ntasks or 1))
        gpus = 1 if self.spec.device.startswith("cuda") else 0
        actor_cls: Any = ray.remote(num_cpus=1, num_gpus=gpus)(ShardWorker)
        self._ray_actors = [actor_cls.remote(self.spec) for _ in range(count)]
        self._ray_pool = ActorPool(self._ray_actors)
        logger.info("analysis sharded over %d Ray actor(s) at %s", count, address or "a local Ray")

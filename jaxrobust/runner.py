"""One resumable runner for every experiment: `ResumableRun(path, tables, config).map(chunks, compute)`.

A driver (critical ε, RoMA, global robustness, batch verification) describes its work as rows keyed by
(network, dataset, split, index) and supplies ``compute(chunk) -> {table: rows}``; the runner owns the rest:

* the store: the HDF5 tables, the configuration (its hash is the ``config`` column of every row), which keys
  are stored already (`pending`: a resumed run skips them, a fresh run refuses to mix with them);
* chunks: each chunk's rows are committed in one transaction by this process, the only writer, so a run
  stopped at any moment (Ctrl-C, a killed job) resumes without losing or duplicating a row;
* where chunks run: here, one chunk per local device at a time (`local_devices`; with several, a thread per
  chunk in flight, its device JAX's default device), or in Ray worker processes, one device each (``workers=N``
  starts a local cluster, kept for later runs of the process; on a CPU host this process computes chunks while
  that cluster starts, and its workers load the programs it compiled meanwhile from a shared persistent
  compilation cache; ``ray_address`` joins a running one). Devices and workers take chunks from a dynamic
  queue (`dynamic_queue`: a slow chunk holds up one of them, not the run); each Ray worker unpickles
  ``compute`` once and keeps its compiled programs warm across chunks; one that dies loses only its chunk in
  flight, which a fresh worker takes first;
* progress (tqdm), a line naming the devices and workers, and a record of them in the file (`store.runs`).

``compute`` must be a picklable callable, safe to call from several threads at once, whose result depends only
on the chunk (randomness keyed by data indices). A chunk is never split over devices: each runs whole on one
device, with the shapes it has on one device, so rows do not depend on the worker, the device count or the
order in which chunks finish, bit for bit. (Splitting a batch over devices would change the shapes XLA
multiplies, and with them the rounding of every row.)
"""
from __future__ import annotations

import atexit
import collections
import os
import queue
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from .errors import InputError, JaxRobustError
from .store import ResultStore, commit

Key = tuple  # (network, dataset, split, index)
MAX_TRIES = 3  # attempts per chunk when workers die
_CHUNK = threading.local()  # .device: the device of the chunk this thread runs (`_DevicePool`)


class Chunk(NamedTuple):
    """Inputs of one work unit: data ids ``(m,)``, network inputs ``(m, *input_shape)``, labels ``(m,)``."""
    ids: np.ndarray
    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def check_scale(devices=None, workers=None, ray_address=None) -> None:
    """Validate the scale-out options (before anything is written): ``devices`` and ``workers`` are None or
    integers >= 1, ``devices`` only without Ray workers (each of those runs on one device); ``workers`` /
    ``ray_address`` need Ray (``pip install 'jaxrobust[ray]'``)."""
    for name, v in (("devices", devices), ("workers", workers)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
            raise InputError(f"{name} must be an integer >= 1, got {v!r}")
    if ray_address is not None and not (isinstance(ray_address, str) and ray_address.strip()):
        raise InputError(f"ray_address must be an address such as 10.0.0.1:6379 or 'auto', got {ray_address!r}")
    if workers is not None or ray_address is not None:
        if devices is not None:
            raise InputError("devices counts the devices of this process; Ray workers run on one device each "
                             "(the GPU Ray gives them): leave devices out")
        try:
            import ray  # noqa: F401
        except ImportError:
            raise InputError("workers / ray_address need Ray: pip install 'jaxrobust[ray]'") from None


def local_devices(devices: int | None = None) -> list:
    """The first ``devices`` of `jax.local_devices()` (all of them when None); in a chunk that `ResumableRun`
    runs on one of several devices, that device alone."""
    import jax
    if getattr(_CHUNK, "device", None) is not None:
        return [_CHUNK.device]
    devs = jax.local_devices()
    if devices is None:
        return devs
    check_scale(devices)
    if devices > len(devs):
        raise InputError(f"devices={devices} but this process has {len(devs)} ({devs[0].platform})")
    return devs[:devices]


def describe(devices: int | None = None) -> dict:
    """Host, process and devices of this process, as stored in a run's record."""
    devs = local_devices(devices)
    return {"host": socket.gethostname(), "pid": os.getpid(), "devices": [str(d) for d in devs],
            "kind": devs[0].device_kind}


class ResumableRun:
    """Tables ``{name: columns}`` of the HDF5 file ``path`` (see `store.ResultStore`), keyed by ``config``.

    The scale-out options are checked before the file is created: ``devices`` limits the local devices that
    run chunks side by side, ``workers`` runs chunks in that many Ray workers (a local cluster unless
    ``ray_address`` names a running one; with an address and no count, one worker per GPU of the cluster, else
    per node).
    """

    def __init__(self, path, tables: Mapping[str, Mapping], config: Mapping, *, resume: bool = False,
                 progress: bool = True, desc: str = "", unit: str = "input", devices: int | None = None,
                 workers: int | None = None, ray_address: str | None = None):
        check_scale(devices, workers, ray_address)
        if workers is None and ray_address is None:
            local_devices(devices)  # a count beyond this host's devices is an error now, not after the file exists
        self.path, self.resume, self.progress, self.desc, self.unit = path, resume, progress, desc, unit
        self.devices, self.workers, self.ray_address = devices, workers, ray_address
        self.stores = {name: ResultStore(path, name, cols) for name, cols in tables.items()}
        self.config = dict(config)
        self.config_hash = next(iter(self.stores.values())).save_config(self.config)

    def pending(self, keys: Sequence[Key], table: str | None = None) -> np.ndarray:
        """``(len(keys),)`` bool: which keys have no row of this configuration in ``table`` (default: the
        first table). Raises `InputError` when some have one and the run does not resume."""
        store = self.stores[table or next(iter(self.stores))]
        d = store.read(("network", "dataset", "split", "index", "config"))
        mine = d["config"] == self.config_hash
        done = set(zip(d["network"][mine], d["dataset"][mine], d["split"][mine], d["index"][mine].tolist()))
        todo = np.array([(str(a), str(b), str(c), int(i)) not in done for a, b, c, i in keys], bool)
        if not self.resume and not todo.all():
            raise InputError(f"{self.path} already holds {int((~todo).sum())} of these rows (same network, data and "
                             "configuration); pass --resume to continue or choose another --out")
        return todo

    def input_chunks(self, net, dataset, indices, size: int) -> tuple[list[Chunk], int]:
        """Chunks of at most ``size`` inputs of ``dataset`` rows ``indices`` (positions) that have no row for
        ``net`` yet (see `pending`), and how many of ``indices`` have one."""
        from .data import to_network_input
        positions = np.asarray(indices, dtype=int)
        keys = [(net.hash, dataset.name, dataset.split, int(i)) for i in dataset.indices[positions]]
        todo = positions[self.pending(keys)]
        chunks = [Chunk(dataset.indices[p], to_network_input(dataset.x[p], net.input_shape), dataset.y[p])
                  for p in (todo[s:s + size] for s in range(0, len(todo), size))]
        return chunks, len(positions) - len(todo)

    def read(self, table: str | None = None) -> dict[str, np.ndarray]:
        """Stored rows of this configuration in ``table`` (default: the first)."""
        d = self.stores[table or next(iter(self.stores))].read()
        mine = d["config"] == self.config_hash
        return {k: v[mine] for k, v in d.items()}

    def map(self, chunks: Sequence, compute: Callable[[Any], Mapping[str, Mapping]], *,
            size: Callable[[Any], int] = len, done: int = 0,
            after: Callable[[Mapping[str, Mapping]], dict | None] | None = None) -> int:
        """Run ``compute`` on every chunk and commit its rows (``{table: columns}``, the ``config`` column
        added here) as each finishes. ``size(chunk)`` counts progress units, ``done`` the units stored before;
        ``after(rows)`` runs once a chunk's rows are committed (a dict it returns becomes the progress bar's
        postfix). Returns the number of chunks committed."""
        from tqdm.auto import tqdm

        bar = tqdm(total=done + sum(size(c) for c in chunks), initial=done, unit=self.unit, disable=not self.progress,
                   desc=self.desc)
        n = 0
        try:
            for chunk, rows in self._results(chunks, compute):
                self._commit(rows)
                n += 1
                bar.update(size(chunk))
                shown = after(rows) if after else None
                if shown:
                    bar.set_postfix(shown)
        finally:
            bar.close()
        return n

    def _results(self, chunks: Sequence, compute) -> Iterable[tuple[Any, Any]]:
        """``(chunk, compute(chunk))`` computed here or by Ray workers, in order of completion."""
        if not chunks:  # everything is stored already: no workers to start
            return
        if not self._remote:
            self._log([describe(self.devices)])
            devices = local_devices(self.devices)
            if len(devices) > 1:
                yield from _DevicePool(compute, devices).imap(chunks)
                return
            for c in chunks:
                yield c, compute(c)
            return
        options = _shared_cache() if self.ray_address is None and _on_this_host() else {}  # before compiling here
        ahead = _Ahead(compute, chunks) if self.ray_address is None and _starts_cpu_cluster() else None
        pool = _RayPool(compute, self.workers, self.ray_address, options)
        try:
            done, running = ahead.stop() if ahead else ([], None)
            here = [dict(describe(1), role="driver")] if done or running is not None else []
            self._log(pool.hosts + here)
            yield from ((chunks[i], rows) for i, rows in done)
            taken = {i for i, _ in done} | ({running} if running is not None else set())
            yield from pool.imap([c for i, c in enumerate(chunks) if i not in taken])
            if running is not None:
                yield chunks[running], ahead.last()
        finally:
            pool.close()

    def _log(self, hosts: list[dict]) -> None:
        record = {"config": self.config_hash, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "workers": len(hosts),
                  "ray_address": self.ray_address, "hosts": hosts}
        next(iter(self.stores.values())).log_run(record)
        if self.progress:
            from tqdm.auto import tqdm
            tqdm.write(f"{self.desc}: {_where(hosts)}", file=sys.stderr)

    @property
    def _remote(self) -> bool:
        return self.workers is not None or self.ray_address is not None

    def _commit(self, rows: Mapping[str, Mapping]) -> None:
        batches = []
        for table, cols in rows.items():
            m = len(cols["index"])
            batches.append((self.stores[table], {**cols, "config": [self.config_hash] * m}))
        commit(batches)


def _where(hosts: list[dict]) -> str:
    kinds = collections.Counter(f"{len(h['devices'])} x {h['kind']}" for h in hosts)
    names = sorted({h["host"] for h in hosts})
    per = ", ".join(f"{n} worker{'s' * (n > 1)} with {k}" for k, n in kinds.items())
    return f"{per} on {', '.join(names)}" if len(hosts) > 1 else f"{per.split(' with ', 1)[1]} on {names[0]}"


def dynamic_queue(n: int, workers: list, submit: Callable, wait: Callable, replace: Callable
                  ) -> Iterable[tuple[int, Any]]:
    """Chunks ``0 .. n-1`` over ``workers``, each idle worker taking the next chunk; yields ``(chunk, result)``
    in order of completion.

    ``submit(worker, i) -> ticket`` starts chunk ``i``; ``wait(tickets) -> (ticket, result, died)`` returns a
    finished one; when its worker ``died``, ``replace(worker) -> worker`` starts a fresh one, which takes the
    lost chunk first (at most `MAX_TRIES` attempts per chunk).
    """
    todo, tries, running = collections.deque(range(n)), collections.Counter(), {}

    def give(worker):
        if todo:
            i = todo.popleft()
            tries[i] += 1
            running[submit(worker, i)] = (worker, i)

    for w in workers:
        give(w)
    while running:
        ticket, result, died = wait(list(running))
        worker, i = running.pop(ticket)
        if died:
            if tries[i] >= MAX_TRIES:
                raise RuntimeError(f"chunk {i} was lost with {MAX_TRIES} workers in a row")
            todo.appendleft(i)
            give(replace(worker))
            continue
        give(worker)
        yield i, result


class _DevicePool:
    """Chunks on several devices of this process, fed from `dynamic_queue`: each chunk in a thread of its own
    (a daemon: an interrupted run does not wait for it) with its device as JAX's default device and as
    `local_devices`. Arrays made in ``compute`` land on that device; uncommitted ones made before (network
    parameters) are copied there by each program that takes them."""

    def __init__(self, compute, devices: list):
        self.compute, self.devices, self.done = compute, devices, queue.SimpleQueue()

    def _run(self, device, i: int, chunk) -> None:
        import jax
        _CHUNK.device = device
        try:
            with jax.default_device(device):
                self.done.put((i, self.compute(chunk), None))
        except BaseException as e:  # noqa: BLE001  raised again by the thread that reads the results
            self.done.put((i, None, e))

    def imap(self, chunks: Sequence) -> Iterable[tuple[Any, Any]]:
        """``(chunk, compute(chunk))`` in order of completion; a chunk's exception is raised here."""
        def submit(device, i):
            threading.Thread(target=self._run, args=(device, i, chunks[i]), daemon=True).start()
            return i

        def wait(_):
            i, rows, error = self.done.get()
            if error is not None:
                raise error
            return i, rows, False

        for i, rows in dynamic_queue(len(chunks), self.devices, submit, wait, replace=None):
            yield chunks[i], rows


# --- Ray -----------------------------------------------------------------------------------------------
def _starts_cpu_cluster() -> bool:
    """Whether the workers will be a local cluster that this process starts on a CPU host: then it computes
    chunks while they start (a GPU is left to them)."""
    import jax
    import ray
    return not ray.is_initialized() and jax.default_backend() == "cpu"


def _on_this_host() -> bool:
    """Whether the workers run on this host: Ray is not started yet (a local cluster will be), or its only node
    is this process's."""
    import ray
    if not ray.is_initialized():
        return True
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    return alive == [ray.get_runtime_context().get_node_id()]


class _Ahead:
    """Chunks computed in this process, in order, in a thread of their own, while a local Ray cluster and its
    workers start (seconds each); the programs compiled meanwhile go to the workers through `_shared_cache`.
    `stop` hands the rest to them."""

    def __init__(self, compute, chunks: Sequence):
        self.compute, self.chunks = compute, chunks
        self.done, self.running, self.error = [], None, None
        self.halt, self.lock = threading.Event(), threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for i, chunk in enumerate(self.chunks):
            with self.lock:
                if self.halt.is_set():
                    return
                self.running = i
            try:
                rows = self.compute(chunk)
            except BaseException as e:  # noqa: BLE001  raised again by `last` or `stop`
                self.error = e
                return
            with self.lock:
                self.done.append((i, rows))
                self.running = None

    def stop(self) -> tuple[list, int | None]:
        """``(done, running)``: the ``(index, rows)`` finished here, and the index still being computed (or None),
        whose rows `last` returns."""
        with self.lock:
            self.halt.set()
            if self.error is not None:
                raise self.error
            return list(self.done), self.running

    def last(self):
        """The rows of the chunk that was running at `stop`."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.done[-1][1]


def _shared_cache() -> dict:
    """JAX options that give this process and the workers of its local cluster one persistent compilation cache,
    every program stored: this process's cache directory, else a temporary one for its lifetime. A worker then
    loads what this process or another worker compiled before it instead of compiling it again (seconds per
    worker, the same executable)."""
    import jax
    if not jax.config.jax_compilation_cache_dir:
        path = tempfile.mkdtemp(prefix="jaxrobust-xla-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                                                "jax_persistent_cache_min_entry_size_bytes")}


class _Worker:
    """One Ray actor: pinned to the GPU Ray gave it, JAX ``options`` set, then ``compute`` is unpickled once, so
    its compiled programs stay warm across chunks (which run on its first device)."""

    def __init__(self, blob: bytes, options: dict):
        import jax
        import ray
        gpus = ray.get_gpu_ids()
        if gpus:  # before JAX starts its backend: this worker sees its own GPUs only
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        for k, v in options.items():
            jax.config.update(k, v)
        self.compute = ray.cloudpickle.loads(blob)

    def describe(self) -> dict:
        return describe(1)

    def run(self, chunk):
        return self.compute(chunk)


class _RayPool:
    """Ray workers fed from a dynamic queue of chunks; a dead worker is replaced and its chunk retried."""

    def __init__(self, compute, workers, address, options: dict):
        import warnings

        import ray
        self.ray = ray
        if not ray.is_initialized():
            with warnings.catch_warnings():  # Ray's fork() of its daemons, which never run JAX
                warnings.simplefilter("ignore", (DeprecationWarning, RuntimeWarning))
                if address is None:  # "local": a new cluster, even where `ray start` left an address behind
                    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
                             logging_level="ERROR")
                else:
                    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        if workers is None:
            workers = gpus or len([n for n in ray.nodes() if n["Alive"]])
        opts = {"num_gpus": min(1.0, gpus / workers)} if gpus else {"num_cpus": min(1.0, res.get("CPU", 1) / workers)}
        self.actor_class = ray.remote(**opts)(_Worker)
        self.compute, self.options = ray.put(ray.cloudpickle.dumps(compute)), options
        self.actors = [self._start() for _ in range(workers)]
        self.hosts = self._get([a.describe.remote() for a in self.actors])

    def _start(self):
        return self.actor_class.remote(self.compute, self.options)

    def _get(self, refs):
        """``ray.get`` that raises a failed task's own jaxrobust error (one line in the CLI)."""
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, JaxRobustError):
                raise e.cause from None
            raise e.as_instanceof_cause() from None

    def imap(self, chunks: Sequence) -> Iterable[tuple[Any, Any]]:
        """``(chunk, compute(chunk))`` in order of completion (`dynamic_queue` over the workers)."""
        ray = self.ray

        def wait(refs):
            [ref], _ = ray.wait(refs, num_returns=1)
            try:
                return ref, self._get(ref), False
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                return ref, None, True

        def replace(actor):
            self.actors[self.actors.index(actor)] = fresh = self._start()
            return fresh

        for i, rows in dynamic_queue(len(chunks), self.actors, lambda a, i: a.run.remote(chunks[i]), wait, replace):
            yield chunks[i], rows

    def close(self) -> None:
        """End the workers; a local cluster started here stays up for later runs of this process (Ray ends it
        when the process exits, or call ``ray.shutdown()``)."""
        for a in self.actors:
            self.ray.kill(a)

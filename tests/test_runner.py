"""The resumable runner: pending rows, one writer, devices and Ray workers give the rows of one process, bit for bit.

Drivers run on a 784-16-10 zoo MLP whose labels are its own predictions (every input is searched) and
on small class generators of `jaxrobust.gan`, so the work units are cheap and every query is decided well
inside its budgets (results cannot depend on timing).
"""
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxrobust import critical_eps, gan, generative, instances, roma, zoo
from jaxrobust.data import from_arrays, load_dataset
from jaxrobust.errors import FileFormatError, InputError
from jaxrobust.runner import Chunk, ResumableRun, check_scale
from jaxrobust.store import ResultStore
from jaxrobust.weights import save_network

ROOT = Path(__file__).resolve().parents[1]
SEARCH = critical_eps.SearchConfig(eps_max=0.1, tol=0.002)
ATTACK = {"attack_steps": 10, "targets": 2, "min_norm_steps": 20}
# a time limit no query reaches even while a loaded machine compiles, so rows never depend on the clock
COMPLETE = {"attack_steps": 10, "targets": 2, "timeout": 600.0}
ROMA = roma.RomaConfig(eps=0.05, samples=300)


def tiny_net():
    return zoo.init(zoo.arch("mlp", hidden=(16,)), jax.random.PRNGKey(0))


def tiny_data(net, n=8):
    x = load_dataset("mnist", "test").x[:n]
    return from_arrays(x, np.asarray(net(x.reshape(n, *net.input_shape))).argmax(-1), "toy", num_classes=10)


def generators():
    arch = gan.gan_arch(latent_dim=4, hidden=(16,), disc_hidden=(8,))
    import optax
    params = gan._init(arch, jax.random.PRNGKey(0), optax.identity()).g_params
    return {3: gan.make_generator(arch, params), 5: gan.make_generator(arch, params, name="other")}


def rows_of(store) -> dict:
    """Every column but ``time_s``, rows sorted by key; asserts there is no duplicate key."""
    d = store.read()
    keys = list(zip(d["network"], d["dataset"], d["split"], d["index"].tolist(), d["config"]))
    assert len(set(keys)) == len(keys), "duplicate rows"
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return {k: v[order] for k, v in d.items() if k != "time_s"}


def assert_same_rows(a: dict, b: dict):
    """Equal rows, every column bit for bit (NaN equals NaN)."""
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k, strict=True)


def drivers(tmp, name: str, **scale) -> dict:
    """Rows of each driver (critical ε with the attack and the complete oracle, RoMA, and every table of global
    correctness and robustness) written to files ``tmp/name_*.h5`` with the scale-out options ``scale``."""
    net = tiny_net()
    ds = tiny_data(net)
    out = {}
    for oracle in ("attack", "complete"):
        s = critical_eps.run(net, ds, range(8), oracle, SEARCH, tmp / f"{name}_{oracle}.h5", chunk=4, progress=False,
                             oracle_options=ATTACK if oracle == "attack" else COMPLETE,
                             **scale)
        out[oracle] = rows_of(s)
    out["roma"] = rows_of(roma.run(net, ds, range(8), ROMA, tmp / f"{name}_roma.h5", chunk=4, progress=False, **scale))
    gens = generators()
    generative.run_global(net, gens, tmp / f"{name}_global.h5", samples=64, eps=0.2, robust_samples=16,
                          attack_steps=5, max_saved=10, progress=False, **scale)
    g = gens[3]
    for table, cols in generative._tables(g.latent_dim, g.output_shape).items():
        out[table] = rows_of(ResultStore(tmp / f"{name}_global.h5", table, cols))
    return out


def compare(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert_same_rows(a[k], b[k])
    assert len(a["global_adversarial"]["index"]) and len(a["global_misclassified"]["index"])  # latents compared


# --- the runner itself ---------------------------------------------------------------------------------
class Square:
    """A picklable compute: ``index²`` of every id of a chunk."""

    def __call__(self, ids):
        return {"t": {"network": ["n"] * len(ids), "dataset": ["d"] * len(ids), "split": ["s"] * len(ids),
                      "index": ids, "value": np.square(ids).astype(float)}}


def test_pending_resume_and_run_record(tmp_path, capsys):
    path = tmp_path / "r.h5"
    cols = {"t": {"value": ("f8", ())}}
    run = ResumableRun(path, cols, {"k": 1}, progress=True, desc="squares")
    assert run.map([[0, 1], [2]], Square()) == 2
    assert "squares: 1 x cpu on" in capsys.readouterr().err
    keys = [("n", "d", "s", i) for i in range(5)]
    with pytest.raises(InputError, match="resume"):
        ResumableRun(path, cols, {"k": 1}).pending(keys)
    again = ResumableRun(path, cols, {"k": 1}, resume=True, progress=False)
    todo = again.pending(keys)
    np.testing.assert_array_equal(todo, [False, False, False, True, True])
    again.map([[3, 4]], Square(), done=3)
    d = again.read("t")
    assert sorted(d["index"].tolist()) == [0, 1, 2, 3, 4] and set(d["config"]) == {run.config_hash}
    np.testing.assert_array_equal(d["value"][np.argsort(d["index"])], [0, 1, 4, 9, 16])
    other = ResumableRun(path, cols, {"k": 2}, progress=False)  # another configuration: nothing done yet
    assert other.pending(keys).all() and len(other.read("t")["index"]) == 0
    record = other.stores["t"].runs()
    assert len(record) == 2 and record[0]["workers"] == 1 and record[0]["hosts"][0]["devices"] == ["cpu:0"]


class Interrupted(Square):
    """`Square`, but Ctrl-C arrives during the chunk that starts at id 2."""

    def __call__(self, ids):
        if ids[0] == 2:
            raise KeyboardInterrupt
        return super().__call__(ids)


def test_interrupted_run_keeps_its_chunks_and_resumes(tmp_path):
    cols = {"t": {"value": ("f8", ())}}
    with pytest.raises(KeyboardInterrupt):
        ResumableRun(tmp_path / "r.h5", cols, {"k": 1}, progress=False).map([[0, 1], [2, 3], [4]], Interrupted())
    run = ResumableRun(tmp_path / "r.h5", cols, {"k": 1}, resume=True, progress=False)
    todo = run.pending([("n", "d", "s", i) for i in range(5)])
    np.testing.assert_array_equal(todo, [False, False, True, True, True])
    run.map([[2, 3], [4]], Square(), done=2)
    assert sorted(run.read("t")["index"].tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("bad, match", [({"devices": 0}, "devices"), ({"workers": 0}, "workers"),
                                        ({"devices": 99}, "devices=99"), ({"workers": 1.5}, "workers"),
                                        ({"ray_address": ""}, "ray_address"),
                                        ({"devices": 1, "workers": 2}, "leave devices out")])
def test_bad_scale_options_write_nothing(tmp_path, bad, match):
    net = tiny_net()
    with pytest.raises(InputError, match=match):
        critical_eps.run(net, tiny_data(net, 2), range(2), "attack", SEARCH, tmp_path / "x.h5", progress=False, **bad)
    with pytest.raises(InputError, match="unknown option 'steps'"):
        critical_eps.run(net, tiny_data(net, 2), range(2), "attack", SEARCH, tmp_path / "x.h5", progress=False,
                         oracle_options={"steps": 3})
    assert not (tmp_path / "x.h5").exists()


def test_without_ray_workers_are_one_line_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(InputError, match=r"jaxrobust\[ray\]"):
        check_scale(workers=2)
    check_scale(devices=1)


def test_oracle_options_key_the_rows_explicitly():
    full = critical_eps.full_options("attack", {"targets": 3})
    assert full == {**critical_eps.ATTACK_OPTIONS, "targets": 3}
    complete = critical_eps.full_options("complete", {"timeout": 5.0})
    assert complete["timeout"] == 5.0 and complete["max_domains"] > 0 and "attack_steps" in complete
    with pytest.raises(InputError, match="oracle"):
        critical_eps.full_options("magic")


def test_rows_name_the_attacks_that_ran(tmp_path):
    """A censored input means every attack of its configuration failed up to eps_max: the stored configuration
    names them, and switching the bound-guided attack off is another configuration."""
    net = tiny_net()
    ds = tiny_data(net, 4)
    for guided in (True, False):
        critical_eps.run(net, ds, range(4), "attack", SEARCH, tmp_path / "r.h5", progress=False,
                         oracle_options={**ATTACK, "guided": guided})
    configs = ResultStore(tmp_path / "r.h5", critical_eps.TABLE, critical_eps.columns(ds.image_shape)).configs()
    keys = sorted(tuple(c["attacks"]) for c in configs.values())
    assert keys == [("min-norm", "min-norm-leaky"), ("min-norm", "min-norm-leaky", "bound-guided")]


# --- batch verification of an instances file ----------------------------------------------------------
PROPERTY = """; x within eps of an image, the label's logit not the largest
{inputs}
(assert (or {outputs}))
"""


def write_instances(tmp, net, ds, eps=(0.001, 0.3)):
    save_network(net, tmp / "net.msgpack")
    x = ds.x[0].reshape(-1).astype(float)
    y = int(ds.y[0])
    lines = []
    for k, e in enumerate(eps):
        inputs = "\n".join(f"(declare-const X_{i} Real)" for i in range(x.size)) + "\n"
        inputs += "\n".join(f"(declare-const Y_{j} Real)" for j in range(10)) + "\n"
        inputs += "\n".join(f"(assert (>= X_{i} {max(0.0, v - e):.9g}))\n(assert (<= X_{i} {min(1.0, v + e):.9g}))"
                            for i, v in enumerate(x))
        outputs = " ".join(f"(and (>= Y_{j} Y_{y}))" for j in range(10) if j != y)
        (tmp / f"p{k}.vnnlib").write_text(PROPERTY.format(inputs=inputs, outputs=outputs))
        lines.append(f"net.msgpack,p{k}.vnnlib,30")
    (tmp / "instances.csv").write_text("\n".join(lines) + "\n")
    return tmp / "instances.csv"


def test_instances_file_is_verified_and_resumes(tmp_path):
    net = tiny_net()
    csv = write_instances(tmp_path, net, tiny_data(net, 1))
    store = instances.run(csv, tmp_path / "v.h5", progress=False)
    d = store.read()
    assert list(d["index"]) == [0, 1] and list(d["result"]) == ["unsat", "sat"]
    assert d["witness"][1].startswith("((X_0 ") and d["witness"][0] == "" and np.all(d["timeout"] == 30)
    with pytest.raises(InputError, match="resume"):
        instances.run(csv, tmp_path / "v.h5", progress=False)
    csv.write_text(csv.read_text() + "net.msgpack,p1.vnnlib,30\n")
    store = instances.run(csv, tmp_path / "v.h5", resume=True, progress=False)
    assert list(store.read()["index"]) == [0, 1, 2]


def test_bad_instances_files_write_nothing(tmp_path):
    (tmp_path / "a.csv").write_text("missing.onnx,p.vnnlib,10\n")
    with pytest.raises(InputError, match="row 1: no file"):
        instances.run(tmp_path / "a.csv", tmp_path / "v.h5", progress=False)
    (tmp_path / "b.csv").write_text("x,y\n")
    with pytest.raises(FileFormatError, match="row 1"):
        instances.run(tmp_path / "b.csv", tmp_path / "v.h5", progress=False)
    with pytest.raises(InputError, match="no instances file"):
        instances.run(tmp_path / "none.csv", tmp_path / "v.h5", progress=False)
    assert not (tmp_path / "v.h5").exists()


# --- all local devices -----------------------------------------------------------------------------------
class WhereRun(Square):
    """`Square` with the device each chunk ran on: of an array it makes, and `runner.local_devices`; fails at
    id ``fail``."""

    def __init__(self, fail: int = -1):
        self.fail = fail

    def __call__(self, ids):
        import jax.numpy as jnp

        from jaxrobust.runner import local_devices
        if self.fail in ids:
            raise InputError(f"chunk of id {self.fail}")
        rows = super().__call__(ids)
        rows["t"]["device"] = [f"{jnp.zeros(1).device} {local_devices()[0]}"] * len(ids)
        return rows


FOUR_DEVICES = textwrap.dedent("""
    import pickle, sys
    from pathlib import Path
    import jax
    from jaxrobust.errors import InputError
    from jaxrobust.runner import ResumableRun
    from tests.test_runner import WhereRun, drivers
    assert jax.local_device_count() == 4, jax.devices()
    tmp = Path(sys.argv[1])
    cols = {"t": {"value": ("f8", ()), "device": ("str", ())}}
    run = ResumableRun(tmp / "where.h5", cols, {"k": 1}, progress=False)
    assert run.map([[i] for i in range(8)], WhereRun()) == 8
    where = sorted(run.read("t")["device"])
    try:
        ResumableRun(tmp / "where.h5", cols, {"k": 2}, progress=False).map([[i] for i in range(8)], WhereRun(5))
        failed = ""
    except InputError as e:
        failed = str(e)
    pickle.dump({"all": drivers(tmp, "all"), "one": drivers(tmp, "one", devices=1), "where": where,
                 "failed": failed}, open(tmp / "rows.pkl", "wb"))
""")


@pytest.mark.slow
def test_four_devices_give_the_rows_of_one(tmp_path):
    """Each chunk runs whole on one of the four devices (never split over them), so every column of every
    driver's rows, distances and statistics included, equals the one-device run's bit for bit."""
    import pickle
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-c", FOUR_DEVICES, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = pickle.load(open(tmp_path / "rows.pkl", "rb"))
    compare(rows["all"], rows["one"])
    run = ResultStore(tmp_path / "all_roma.h5", roma.TABLE, roma.COLUMNS).runs()[-1]
    assert run["hosts"][0]["devices"] == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
    # the first four chunks went to the four devices at once; each chunk's arrays lived on its device
    assert {d.split()[0] for d in rows["where"]} == {"cpu:0", "cpu:1", "cpu:2", "cpu:3"}
    assert all(d.split()[0] == d.split()[1] for d in rows["where"])
    assert rows["failed"] == "chunk of id 5"  # a chunk's error reaches the caller


# --- Ray workers -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of two CPUs for this module (the runner joins it instead of starting one)."""
    ray = pytest.importorskip("ray")
    with warnings.catch_warnings():  # Ray's fork() of its daemons, which never run JAX
        warnings.simplefilter("ignore", (DeprecationWarning, RuntimeWarning))
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_two_ray_workers_give_the_rows_of_one_process(tmp_path, ray_cluster):
    compare(drivers(tmp_path, "ray", workers=2), drivers(tmp_path, "local"))
    run = ResultStore(tmp_path / "ray_roma.h5", roma.TABLE, roma.COLUMNS).runs()[-1]
    assert run["workers"] == 2 and len({h["pid"] for h in run["hosts"]}) == 2


@pytest.fixture
def ray_head(tmp_path):
    """``(127.0.0.1:PORT, environment)`` of a Ray head node of two CPUs, started for one test by ``ray start --head
    --block`` in a temporary directory of its own (where it leaves its address for ``ray.init()``) and stopped
    by ending that process, which ends the node's processes and no other Ray processes. Token authentication,
    on by default for ``ray start`` in Ray 2.60, is off (``RAY_AUTH_MODE=disabled``, also for the driver): a
    driver without ``RAY_AUTH_MODE=token`` and the head's token would be refused."""
    import shutil
    import tempfile
    pytest.importorskip("ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    temp = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths lie below it
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}",
                             "--num-cpus=2", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                             "--disable-usage-stats", f"--temp-dir={temp}", "--block"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(240):
            text = (tmp_path / "head.log").read_text()
            if "Ray runtime started" in text or head.poll() is not None:
                break
            time.sleep(0.5)
        if "Ray runtime started" not in text:
            pytest.skip(f"the Ray head node did not start: {text[-1000:]}")
        yield f"127.0.0.1:{port}", env
    finally:
        head.terminate()
        head.wait(timeout=120)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


RAY_ADDRESS_RUN = textwrap.dedent("""
    import pickle, sys
    from pathlib import Path
    from tests.test_runner import drivers
    tmp, address = Path(sys.argv[1]), sys.argv[2]
    pickle.dump({"cluster": drivers(tmp, "cluster", ray_address=address), "local": drivers(tmp, "local")},
                open(tmp / "rows.pkl", "wb"))
""")


@pytest.mark.slow
def test_ray_address_joins_a_running_cluster(tmp_path, ray_head):
    """Every driver with ``ray_address="127.0.0.1:PORT"`` of a head node started apart gives the rows of one process
    (a fresh process drives it: this one may hold the module's own cluster)."""
    import pickle
    address, env = ray_head
    p = subprocess.run([sys.executable, "-c", RAY_ADDRESS_RUN, str(tmp_path), address], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = pickle.load(open(tmp_path / "rows.pkl", "rb"))
    compare(rows["cluster"], rows["local"])
    run = ResultStore(tmp_path / "cluster_roma.h5", roma.TABLE, roma.COLUMNS).runs()[-1]
    assert run["ray_address"] == address and run["workers"] == 1


OWN_CLUSTER_RUN = textwrap.dedent("""
    import pickle, sys
    from pathlib import Path
    from jaxrobust import critical_eps
    from tests.test_runner import ATTACK, SEARCH, rows_of, tiny_data, tiny_net
    tmp = Path(sys.argv[1])
    net = tiny_net()
    ds = tiny_data(net)
    rows = {name: rows_of(critical_eps.run(net, ds, range(8), "attack", SEARCH, tmp / f"{name}.h5", chunk=1,
                                           progress=False, oracle_options=ATTACK, **scale))
            for name, scale in (("ray", {"workers": 2}), ("local", {}))}
    import jax, os
    rows["cached"] = len(os.listdir(jax.config.jax_compilation_cache_dir))
    pickle.dump(rows, open(tmp / "rows.pkl", "wb"))
""")


@pytest.mark.slow
def test_workers_starting_their_cluster_leave_the_rows_of_one_process(tmp_path):
    """While ``workers=2`` start a local cluster, this process computes chunks itself, storing its programs in the
    compilation cache it shares with the workers: the rows are those of one process, and the run record names the
    driver beside the workers."""
    import pickle
    pytest.importorskip("ray")
    p = subprocess.run([sys.executable, "-c", OWN_CLUSTER_RUN, str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = pickle.load(open(tmp_path / "rows.pkl", "rb"))
    assert_same_rows(rows["local"], rows["ray"])
    assert rows["cached"] > 0
    shape = tiny_data(tiny_net()).image_shape
    run = ResultStore(tmp_path / "ray.h5", critical_eps.TABLE, critical_eps.columns(shape)).runs()[-1]
    roles = [h.get("role", "worker") for h in run["hosts"]]
    assert roles.count("worker") == 2 and roles.count("driver") == 1, run


class KillOnce:
    """The critical-ε compute, except that the first process to reach the chunk starting at id ``at``
    kills itself (SIGKILL) in the middle of it."""

    def __init__(self, task, at: int, marker: str):
        self.task, self.at, self.marker = task, at, marker

    def __call__(self, chunk: Chunk):
        if int(chunk.ids[0]) == self.at and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return self.task(chunk)


@pytest.mark.slow
def test_killed_worker_loses_only_its_chunk(tmp_path, ray_cluster):
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import the tests
    net = tiny_net()
    ds = tiny_data(net)
    options = critical_eps.full_options("attack", ATTACK)
    task = critical_eps._Task(net, "attack", options, SEARCH, 256, (ds.name, ds.split, ds.image_shape))
    config = task.config()
    tables = {critical_eps.TABLE: critical_eps.columns(ds.image_shape)}
    results = {}
    for name, compute, scale in (("one", task, {}), ("ray", KillOnce(task, 3, str(tmp_path / "killed")),
                                                     {"workers": 2})):
        run = ResumableRun(tmp_path / f"{name}.h5", tables, config, progress=False, **scale)
        chunks, _ = run.input_chunks(net, ds, range(8), 3)
        assert run.map(chunks, compute) == 3
        results[name] = rows_of(run.stores[critical_eps.TABLE])
    assert (tmp_path / "killed").exists()
    assert_same_rows(results["one"], results["ray"])
    direct = critical_eps.run(net, ds, range(8), "attack", SEARCH, tmp_path / "driver.h5", chunk=3, progress=False,
                              oracle_options=ATTACK)
    assert_same_rows(results["one"], rows_of(direct))


def test_dynamic_queue_feeds_idle_workers_and_retries_lost_chunks():
    from jaxrobust.runner import MAX_TRIES, dynamic_queue
    times = [5.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    clock, running, log = [0.0], {}, []

    def submit(worker, i):
        running[len(log)] = (clock[0] + times[i], worker, i)
        log.append((worker, i))
        return len(log) - 1

    def wait(tickets):
        t = min(tickets, key=lambda k: running[k][0])
        end, worker, i = running.pop(t)
        clock[0] = end
        return t, i * 10, worker == "doomed"

    out = list(dynamic_queue(6, ["a", "b"], submit, wait, lambda w: "c"))
    assert sorted(out) == [(i, i * 10) for i in range(6)] and clock[0] == 5.0  # b ran the five short chunks
    assert [i for w, i in log if w == "b"] == [1, 2, 3, 4, 5]
    out = list(dynamic_queue(3, ["a", "doomed"], submit, wait, lambda w: "c"))
    assert sorted(out) == [(0, 0), (1, 10), (2, 20)] and ("c", 1) in log  # the lost chunk went to a fresh worker
    with pytest.raises(RuntimeError, match="lost"):
        list(dynamic_queue(1, ["doomed"], submit, wait, lambda w: "doomed"))
    assert MAX_TRIES == 3


@pytest.mark.slow
def test_gpu_benchmark_script_runs_small_on_cpu():
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--size", "small"], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert lines[0].startswith("device: cpu")
    assert [line.split()[0] for line in lines[2:7]] == ["bounds", "attacks", "RoMA", "critical", "verify"]
    assert subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--size", "huge"], capture_output=True,
                          text=True).returncode == 2

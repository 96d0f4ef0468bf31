"""tenso.torch: collate / Collate(pool=...) on real DataLoaders against torch's default_collate."""

from __future__ import annotations

import collections
import functools
import gc
import os
import pickle
import signal
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.multiprocessing  # noqa: E402  (registers torch's reducers with ForkingPickler)
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info  # noqa: E402

import tenso.torch as tt  # noqa: E402

pytestmark = [
    pytest.mark.torch,
    # Python >= 3.12 warns when a process with threads forks (the fork-context loaders and the fork test do).
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]

Point = collections.namedtuple("Point", ["x", "y"])


# ---------------------------------------------------------------------------------------------------------------
# Comparing batches
# ---------------------------------------------------------------------------------------------------------------
def assert_same(got: Any, want: Any, path: str = "batch") -> None:
    """Same structure, container types, dtypes, shapes and values as default_collate's output."""
    assert type(got) is type(want), f"{path}: {type(got)} != {type(want)}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, f"{path}: {got.dtype}{tuple(got.shape)}"
        assert torch.equal(got, want), f"{path}: values differ"
        assert got.is_contiguous() and got.stride() == want.stride(), path
    elif isinstance(want, dict):
        assert list(got) == list(want), f"{path}: keys"
        for k in want:
            assert_same(got[k], want[k], f"{path}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{path}: length"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def clone(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.clone()
    if isinstance(batch, dict):
        return {k: clone(v) for k, v in batch.items()}
    if isinstance(batch, Point):
        return Point(*(clone(v) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(clone(v) for v in batch)
    return batch


# ---------------------------------------------------------------------------------------------------------------
# Datasets (module level: the spawn context pickles them by reference)
# ---------------------------------------------------------------------------------------------------------------
def nested_sample(i: int) -> dict[str, Any]:
    rng = np.random.default_rng(i)
    img = rng.integers(0, 255, (3, 16, 16), dtype=np.uint8)
    return {
        "image": img,
        "mask": torch.from_numpy(img[0] > 127),
        "label": i % 7,
        "weight": i / 3,
        "flag": bool(i % 2),
        "name": f"sample-{i}",
        "raw": b"\x00" * (i % 3),
        "point": Point(np.float32(i), torch.tensor([i, -i], dtype=torch.int16)),
        "pair": (torch.arange(3, dtype=torch.float64) * i, np.full((2, 2), i, dtype=np.int32)),
        "feats": [rng.standard_normal(5).astype(np.float16), torch.zeros(0, 4)],
        "t": torch.randn(4, 6, generator=torch.Generator().manual_seed(i)).t(),  # non-contiguous
        "bf16": torch.full((3,), i, dtype=torch.bfloat16),
        "scalar": torch.tensor(i * 1.5),
    }


class NestedDataset(Dataset):
    def __init__(self, n: int = 24) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return nested_sample(i)


class FieldsDataset(Dataset):
    """Dicts of `fields` float32 arrays of `width` values."""

    def __init__(self, n: int, fields: int, width: int) -> None:
        self.n, self.fields, self.width = n, fields, width

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {f"f{k}": np.full(self.width, i * 100 + k, dtype=np.float32) for k in range(self.fields)}


class KillingDataset(FieldsDataset):
    """A worker SIGKILLs itself on index `kill_at`, after its earlier batches were sent."""

    def __init__(self, n: int, fields: int, width: int, kill_at: int) -> None:
        super().__init__(n, fields, width)
        self.kill_at = kill_at

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if i == self.kill_at and get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(i)


def expected_batches(ds: Dataset, batch_size: int) -> list[Any]:
    return [
        default_collate([ds[i] for i in range(s, min(s + batch_size, len(ds)))]) for s in range(0, len(ds), batch_size)
    ]


@pytest.fixture
def pooled():
    """A Collate factory; every pool it made is removed afterwards and /dev/shm checked."""
    made: list[tt.Collate] = []

    def make(*args: Any, **kwargs: Any) -> tt.Collate:
        c = tt.Collate(*args, **kwargs)
        made.append(c)
        return c

    yield make
    gc.collect()
    for c in made:
        c.close()


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm"))


_REBUILDS = [0]
_rebuild_fd = torch.multiprocessing.reductions.rebuild_storage_fd
_rebuild_filename = torch.multiprocessing.reductions.rebuild_storage_filename


# Module-level (workers pickle them by reference as the rebuild functions of the storages they send).
def counted_rebuild_fd(*args: Any) -> Any:
    _REBUILDS[0] += 1
    return _rebuild_fd(*args)


def counted_rebuild_filename(*args: Any) -> Any:
    _REBUILDS[0] += 1
    return _rebuild_filename(*args)


_ARRIVALS = {"leased": 0, "in band": 0}
_adopt, _from_bytes = tt._adopt, tt._from_bytes


_LEASED: set[int] = set()  # data pointers of the storages adopted from the pool


def counted_adopt(*args: Any) -> Any:
    _ARRIVALS["leased"] += 1
    storage = _adopt(*args)
    _LEASED.add(storage.data_ptr())
    return storage


def _leased(batch: Any) -> bool:
    """Whether the batch's tensors live in a storage adopted from the pool (rather than one sent in band)."""
    leaves = list(batch.values()) if isinstance(batch, dict) else list(batch)
    return any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in _LEASED for t in leaves)


def counted_from_bytes(*args: Any) -> Any:
    _ARRIVALS["in band"] += 1
    return _from_bytes(*args)


class CountRebuilds:
    """Counts the shared segments the main process maps (torch's rebuild_storage_fd / _filename)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        _REBUILDS[0] = 0
        red = torch.multiprocessing.reductions
        monkeypatch.setattr(red, "rebuild_storage_fd", counted_rebuild_fd)
        monkeypatch.setattr(red, "rebuild_storage_filename", counted_rebuild_filename)

    @property
    def count(self) -> int:
        return _REBUILDS[0]


# ---------------------------------------------------------------------------------------------------------------
# Values and types: a Hypothesis corpus of nested samples, through every buffer kind
# ---------------------------------------------------------------------------------------------------------------
DTYPES = ["float32", "float64", "float16", "int8", "int16", "int32", "int64", "uint8", "bool", "complex64"]


@st.composite
def templates(draw: Any, depth: int = 0) -> Any:
    leaf = st.one_of(
        st.tuples(st.sampled_from(["tensor", "ndarray"]), st.sampled_from(DTYPES),
                  st.lists(st.integers(0, 4), max_size=3), st.booleans()),
        st.just(("tensor", "bfloat16", [3], False)),
        st.sampled_from([("int",), ("float",), ("bool",), ("str",), ("bytes",), ("npscalar",)]),
    )
    if depth >= 2:
        return draw(leaf)
    kind = draw(st.sampled_from(["leaf", "leaf", "dict", "list", "tuple", "namedtuple"]))
    if kind == "leaf":
        return draw(leaf)
    if kind == "namedtuple":
        return ("namedtuple", draw(templates(depth + 1)), draw(templates(depth + 1)))
    items = draw(st.lists(templates(depth + 1), min_size=1, max_size=4))
    return (kind, items)


def realize(tpl: Any, rng: np.random.Generator) -> Any:
    kind = tpl[0]
    if kind in ("tensor", "ndarray"):
        _, dtype, shape, transpose = tpl
        if dtype == "bfloat16":
            return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(torch.bfloat16)
        a = np.asarray(np.abs(rng.standard_normal(shape)) * 50).astype(dtype)
        if transpose and a.ndim >= 2:
            a = a.T
        return torch.from_numpy(a) if kind == "tensor" else a
    if kind == "int":
        return int(rng.integers(-1000, 1000))
    if kind == "float":
        return float(rng.standard_normal())
    if kind == "bool":
        return bool(rng.integers(2))
    if kind == "str":
        return "s" * int(rng.integers(4))
    if kind == "bytes":
        return b"b" * int(rng.integers(4))
    if kind == "npscalar":
        return np.float32(rng.standard_normal())
    if kind == "namedtuple":
        return Point(realize(tpl[1], rng), realize(tpl[2], rng))
    items = [realize(t, rng) for t in tpl[1]]
    if kind == "dict":
        return {f"k{i}": v for i, v in enumerate(items)}
    return items if kind == "list" else tuple(items)


@pytest.fixture(scope="module")
def module_pool():
    c = tt.Collate("4MB", inband_bytes=0)
    yield c
    gc.collect()
    c.close()


@given(tpl=templates(), size=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_hypothesis_equal_to_default_collate(tpl: Any, size: int, seed: int, module_pool: Any) -> None:
    rng = np.random.default_rng(seed)
    batch = [realize(tpl, rng) for _ in range(size)]
    want = default_collate(batch)
    assert_same(tt.collate(batch), want)  # the main process (num_workers=0)
    pool = module_pool
    allocators = {
        "segment": lambda n: tt._shared_or_in_band(n, 0),
        "in band": tt._in_band,
        "pool": pool._lease,
    }
    for name, alloc in allocators.items():
        # What a worker sends and the main process receives, through the result queue's pickler.
        packed = tt.PackedBatch(*tt._pack(batch, alloc))
        assert_same(packed.unpack(), want)
        got = pickle.loads(ForkingPickler.dumps(packed))
        del packed
        assert_same(got, want)


def test_main_process_returns_plain_structure() -> None:
    batch = [nested_sample(i) for i in range(3)]
    got = tt.collate(batch)
    assert_same(got, default_collate(batch))
    # Every tensor leaf shares one buffer, each at a 64-byte aligned address.
    leaves = [got[k] for k in ("image", "mask", "label", "weight", "t", "bf16", "scalar")] + list(got["pair"])
    assert len({t.untyped_storage().data_ptr() for t in leaves}) == 1
    assert all(t.data_ptr() % 64 == 0 for t in leaves)


def test_user_collate_map_entries_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    class Custom:
        def __init__(self, v: int) -> None:
            self.v = v

    from torch.utils.data._utils import collate as tc

    monkeypatch.setitem(tc.default_collate_fn_map, Custom, lambda b, *, collate_fn_map=None: sum(c.v for c in b))
    got = tt.collate([{"c": Custom(1), "x": 1}, {"c": Custom(2), "x": 2}])
    assert got["c"] == 3 and torch.equal(got["x"], torch.tensor([1, 2]))


def test_errors_match_default_collate() -> None:
    with pytest.raises(TypeError):
        tt.collate([np.array(["a"]), np.array(["b"])])
    with pytest.raises(RuntimeError):
        tt.collate([[1, 2], [1]])
    with pytest.raises(RuntimeError):
        tt.collate([torch.zeros(2), torch.zeros(3)])


def test_autograd_and_subclass_leaves_keep_torch_path() -> None:
    a = torch.ones(2, requires_grad=True)
    got = tt.collate([{"a": a, "b": 1}, {"a": a * 2, "b": 2}])
    assert got["a"].requires_grad and got["a"].grad_fn is not None


# ---------------------------------------------------------------------------------------------------------------
# Real DataLoaders
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("ctx", "mode"), [("fork", "collate"), ("fork", "pool"), ("spawn", "pool")])
def test_loader_matches_default_collate(ctx: str, mode: str, pooled: Any) -> None:
    ds = NestedDataset(24)
    want = expected_batches(ds, 4)
    fn = functools.partial(tt.collate, inband_bytes=0) if mode == "collate" else pooled("8MB", inband_bytes=0)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=fn, multiprocessing_context=ctx,
                        persistent_workers=True, prefetch_factor=3)
    for _epoch in range(2):
        got = list(loader)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w)
    del loader
    if mode == "pool":
        del got, g
        gc.collect()
        tt._drain_fences(wait=True)  # with a GPU the pool is pinned: freed blocks wait for the CUDA work queued
        assert fn.pool.stats["used_bytes"] == 0  # every batch went back to the pool


def test_num_workers_zero(pooled: Any) -> None:
    ds = NestedDataset(10)
    for fn in (tt.collate, pooled("4MB")):
        for g, w in zip(DataLoader(ds, batch_size=4, collate_fn=fn), expected_batches(ds, 4)):
            assert_same(g, w)


@pytest.mark.parametrize("strategy", ["file_descriptor", "file_system"])
def test_one_segment_per_batch(strategy: str, monkeypatch: pytest.MonkeyPatch, pooled: Any) -> None:
    ds = FieldsDataset(32, fields=20, width=512)  # 20 fields of 16 KiB per batch of 8
    want = expected_batches(ds, 8)
    old = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy(strategy)
    try:
        cases = [
            (default_collate, 20),                                     # the counter sees torch's one per tensor
            (functools.partial(tt.collate, inband_bytes=0), 1),        # one segment per batch
            (functools.partial(tt.collate, inband_bytes=1 << 30), 0),  # in band: none
            (pooled("4MB", inband_bytes=0), 0),                        # pool lease: none
        ]
        for fn, per_batch in cases:
            counter = CountRebuilds(monkeypatch)
            loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=fn, multiprocessing_context="fork")
            got = list(loader)
            for g, w in zip(got, want):
                assert_same(g, w)
            assert counter.count == per_batch * len(want), (fn, counter.count)
            monkeypatch.undo()
            del got, loader
    finally:
        torch.multiprocessing.set_sharing_strategy(old)


def test_bounded_pool_long_epoch_and_kept_batch(pooled: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Batches of 256 KiB through a pool with room for about three, with up to eight in flight (2 workers x
    # prefetch 4) and the program holding some: workers wait, then send in band; the pool never grows and no
    # other segment is made.
    ds = FieldsDataset(320, fields=4, width=2048)
    want = expected_batches(ds, 8)
    collate_fn = pooled(1 << 20, wait=0.05, inband_bytes=0)
    collate_fn.close()  # the scope is per process: drop a pool an earlier test made, so this one has 1 MiB
    pool = collate_fn.pool
    assert pool.stats["pool_size"] == 1 << 20
    region = pool.stats["data_region_size"]
    counter = CountRebuilds(monkeypatch)
    # How batches arrive (forked workers pickle these module-level stand-ins by reference).
    monkeypatch.setattr(tt, "_adopt", counted_adopt)
    monkeypatch.setattr(tt, "_from_bytes", counted_from_bytes)
    _ARRIVALS.update({"leased": 0, "in band": 0})
    _LEASED.clear()
    loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=collate_fn, prefetch_factor=4,
                        multiprocessing_context="fork")
    kept = None
    recent: collections.deque[Any] = collections.deque(maxlen=2)
    peak = 0
    for i, batch in enumerate(loader):
        assert_same(batch, want[i])
        if kept is None and _leased(batch):  # the first batch that arrived through a lease
            kept, kept_copy = batch, clone(batch)
        recent.append(batch)
        used = pool.stats["used_bytes"]
        peak = max(peak, used)
        assert used <= region
    assert i + 1 == len(want)
    assert peak > 0 and counter.count == 0
    # Both ways were taken: leases while there was room, in band after a bounded wait when there was none.
    assert _ARRIVALS["leased"] > 0 and _ARRIVALS["in band"] > 0, _ARRIVALS
    assert _ARRIVALS["leased"] + _ARRIVALS["in band"] == len(want)
    assert _ARRIVALS["leased"] > region // (256 * 1024)  # more leases than fit at once: blocks were recycled
    assert kept is not None
    assert_same(kept, kept_copy)  # the kept batch's memory was never handed to a later batch
    del batch, recent, loader
    gc.collect()
    assert pool.stats["used_bytes"] > 0  # `kept` (the first batch that came through a lease) holds its lease
    del kept
    gc.collect()
    tt._drain_fences(wait=True)
    assert pool.stats["used_bytes"] == 0


def test_pin_memory_thread(pooled: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pin-memory thread unpickles the batch and copies it; the pooled original goes back to the pool."""
    from torch.utils.data._utils import pin_memory as pm

    pinned: list[int] = []
    if not torch.cuda.is_available():
        # Stand in for an accelerator: the loader runs its pin thread, and "pinning" is a copy, as it is on GPU.
        monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
        monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cpu"))
        monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
        monkeypatch.setattr(torch.accelerator, "set_device_index", lambda i: None)
        monkeypatch.setattr(pm, "pin_memory", lambda data, device=None: (pinned.append(1), clone(data))[1])
    ds = NestedDataset(16)
    want = expected_batches(ds, 4)
    fn = pooled("8MB", inband_bytes=0)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=fn, pin_memory=True,
                        multiprocessing_context="fork")
    got = list(loader)
    for g, w in zip(got, want):
        assert_same(g, w)
        if torch.cuda.is_available():
            assert g["image"].is_pinned()
    if not torch.cuda.is_available():
        assert len(pinned) == len(want)  # the pin thread handled every batch
    del loader, got, g
    gc.collect()
    tt._drain_fences(wait=True)
    assert fn.pool.stats["used_bytes"] == 0  # originals released once copied


@pytest.mark.parametrize("mode", ["collate", "pool"])
def test_killed_worker_leaves_dev_shm_as_it_was(mode: str, pooled: Any) -> None:
    before = shm_entries()
    ds = KillingDataset(64, fields=4, width=1024, kill_at=37)
    fn = functools.partial(tt.collate, inband_bytes=0) if mode == "collate" else pooled("4MB", inband_bytes=0)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=fn, prefetch_factor=4,
                        multiprocessing_context="fork")
    got = []
    it = iter(loader)
    # torch's SIGCHLD handler raises the worker's death from wherever the main thread is when the signal lands,
    # possibly after the loop already failed on it; without it the loop finds the dead worker itself.
    handler = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        # The loader reports the dead worker. A result in flight may fail first, as with default_collate: its
        # descriptor cannot be fetched from the dead worker (ConnectionError), or its message was cut (EOFError).
        with pytest.raises((RuntimeError, ConnectionError, EOFError)) as info:
            for b in it:
                got.append(b)
        it._shutdown_workers()  # type: ignore[attr-defined]
    finally:
        signal.signal(signal.SIGCHLD, handler)
    assert not isinstance(info.value, RuntimeError) or "killed by signal" in str(info.value) or (
        "exited unexpectedly" in str(info.value))
    assert got  # batches before the crash arrived
    del got, loader, b, it, info
    gc.collect()
    if mode == "pool":
        assert fn.pool.stats["used_bytes"] == 0  # the dead worker's leases were freed
        fn.close()
    # Other processes on the host may make segments meanwhile: look at names of this process and its workers.
    assert {e for e in shm_entries() - before if str(os.getpid()) in e or e.startswith("torch_")} == set()


def test_forked_child_never_frees_the_parents_lease(module_pool: Any) -> None:
    """A child forked while the parent holds a pooled batch frees its own copy without touching the lease."""
    packed = tt.PackedBatch(*tt._pack([np.arange(64, dtype=np.float32)] * 4, module_pool._lease))
    batch = pickle.loads(ForkingPickler.dumps(packed))  # adopted: this process's lease until `batch` is freed
    del packed
    used = module_pool.pool.stats["used_bytes"]
    assert used > 0
    pid = os.fork()
    if pid == 0:  # the child drops the batch (its finalizer runs here) and exits without cleanup
        try:
            del batch
            gc.collect()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert module_pool.pool.stats["used_bytes"] == used  # still leased
    want = torch.arange(64, dtype=torch.float32).expand(4, 64)
    assert torch.equal(batch, want)
    del batch
    gc.collect()
    assert module_pool.pool.stats["used_bytes"] == 0


# ---------------------------------------------------------------------------------------------------------------
# Collate(pin_memory=...) without a GPU (the CUDA path: tests/test_gpu.py)
# ---------------------------------------------------------------------------------------------------------------
needs_no_cuda = pytest.mark.skipif(
    __import__("tenso.gpu").gpu.available(), reason="checks the behaviour without CUDA"
)


@pytest.fixture
def fresh_pin_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget this process's earlier verdict on pinning (it is probed, and warned about, once per process)."""
    monkeypatch.setattr(tt, "_pin_problem", None)
    monkeypatch.setattr(tt, "_pin_warned", False)


def test_pin_memory_argument(pooled: Any) -> None:
    assert pooled("4MB").pin_memory is None
    assert pooled("4MB", pin_memory=False).pin_memory is False
    c = pooled("4MB", pin_memory=True)
    assert "pin_memory=True" in repr(c)
    with pytest.raises(TypeError, match="pin_memory"):
        tt.Collate("4MB", pin_memory="cuda")  # type: ignore[arg-type]
    c.close()
    assert c.pinned is False  # no pool attached in this process: nothing pinned


@needs_no_cuda
def test_pin_host_without_cuda_is_a_runtime_error(pooled: Any) -> None:
    native = pooled("4MB").pool._pool
    with pytest.raises(RuntimeError, match="CUDA"):
        native._pin_host(0)
    assert native._host_pinned() is False
    native.close()
    with pytest.raises(RuntimeError, match="closed"):
        native._pin_host(0)


@needs_no_cuda
@pytest.mark.parametrize("pin", [True, None, False])
def test_pin_memory_unavailable_batches_still_correct(
    pin: Any, pooled: Any, fresh_pin_state: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = FieldsDataset(48, fields=3, width=1024)
    want = expected_batches(ds, 8)
    fn = pooled("8MB", inband_bytes=0, pin_memory=pin)
    fn.close()  # a fresh pool for this test
    attempts: list[Any] = []
    real = tt._pin_pool
    monkeypatch.setattr(tt, "_pin_pool", lambda pool, p: (attempts.append(p), real(pool, p))[1])
    loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=fn, multiprocessing_context="fork")
    if pin is True:
        with pytest.warns(RuntimeWarning, match="cannot be pinned") as record:
            got = list(loader)
        assert len([w for w in record if "cannot be pinned" in str(w.message)]) == 1  # once, not per batch
    else:
        got = list(loader)  # quietly unpinned (filterwarnings=error turns any warning into a failure)
    for g, w in zip(got, want):
        assert_same(g, w)
        assert not g["f0"].is_pinned()
    assert fn.pinned is False
    # Asked on every pooled batch unless pin_memory=False; the driver is probed once (then the verdict is kept),
    # and with pin_memory=None only once torch uses CUDA, which it never does here.
    assert attempts == ([] if pin is False else [pin] * len(want))
    assert (tt._pin_problem is None) == (pin is not True)
    del got, g, loader
    gc.collect()
    assert not tt._fences  # unpinned batches go back at once
    assert fn.pool.stats["used_bytes"] == 0


class FakeEvent:
    """Stands in for torch.cuda.Event: 'done' once the test says so."""

    def __init__(self) -> None:
        self.done = False
        self.waited = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = True
        self.done = True


def test_freed_pinned_batches_wait_for_their_fence(module_pool: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pinned batch freed while a non-blocking copy may still read it goes back to the pool only after the CUDA
    work queued before it was freed (the fence); the bookkeeping, with fake events."""
    events: list[FakeEvent] = []
    monkeypatch.setattr(tt, "_fence", lambda: (events.append(FakeEvent()), events[-1])[1])
    monkeypatch.setattr(tt, "_host_pinned", lambda pool: True)  # as if the pool were page-locked
    pool = module_pool.pool
    assert pool.stats["used_bytes"] == 0
    handles = [tuple(pool.lease(4096)[0]) for _ in range(3)]
    used = pool.stats["used_bytes"]
    for h in handles:
        tt._release(pool, h, os.getpid())
    assert len(events) == 3 and len(tt._fences) == 3
    assert pool.stats["used_bytes"] == used  # nothing given back: no fence has passed
    events[0].done = True
    tt._drain_fences()
    assert len(tt._fences) == 2 and pool.stats["used_bytes"] < used
    events[2].done = True  # in order: the second still holds the third back
    tt._drain_fences()
    assert len(tt._fences) == 2
    # An unpinned release (or an in-band batch arriving) drains what has passed on the way.
    events[1].done = True
    tt._from_bytes(bytearray(b"x"))
    assert not tt._fences and pool.stats["used_bytes"] == 0
    # close() waits for the fences still pending.
    h = tuple(pool.lease(4096)[0])
    tt._release(pool, h, os.getpid())
    assert pool.stats["used_bytes"] > 0
    tt._drain_fences(wait=True)
    assert events[-1].waited and pool.stats["used_bytes"] == 0
    # Pinned batches freed before torch used CUDA (no fence), and unpinned ones, go back at once.
    monkeypatch.setattr(tt, "_fence", lambda: None)
    h = tuple(pool.lease(4096)[0])
    tt._release(pool, h, os.getpid())
    assert pool.stats["used_bytes"] == 0 and not tt._fences
    # Once torch has used CUDA, an unpinned-looking pool is fenced too: after Collate.close() the handle cannot say
    # whether the mapping is pinned, and the mapping is unpinned and unmapped when its last view goes (defect 4 of
    # issue #19: the old code gave the block back and let the mapping go under a copy that may still read it).
    monkeypatch.setattr(tt, "_fence", lambda: (events.append(FakeEvent()), events[-1])[1])
    monkeypatch.setattr(tt, "_host_pinned", lambda pool: False)
    h = tuple(pool.lease(4096)[0])
    memory = bytearray(8)  # stands in for the batch's view of the mapping
    tt._release(pool, h, os.getpid(), memory)
    assert pool.stats["used_bytes"] > 0 and tt._fences[0][3] is memory  # block and mapping held
    tt._drain_fences(wait=True)
    assert pool.stats["used_bytes"] == 0 and not tt._fences


class BrokenEvent(FakeEvent):
    """An event CUDA cannot answer for (a stream being captured into a graph, a sticky error)."""

    def query(self) -> bool:
        raise RuntimeError("operation not permitted when stream is capturing")

    def synchronize(self) -> None:
        raise RuntimeError("operation not permitted when stream is capturing")


def test_a_fence_that_cannot_be_asked_keeps_its_block(module_pool: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Old code treated any exception from event.query() as 'passed' and gave the block back under a copy that may
    still read it (or be replayed from a graph)."""
    broken = BrokenEvent()
    monkeypatch.setattr(tt, "_fence", lambda: broken)
    pool = module_pool.pool
    h = tuple(pool.lease(4096)[0])
    used = pool.stats["used_bytes"]
    tt._release(pool, h, os.getpid())
    for wait in (False, True):
        tt._drain_fences(wait=wait)
        assert pool.stats["used_bytes"] == used and len(tt._fences) == 1
    monkeypatch.setattr(broken, "query", lambda: True)  # the capture ended: the next drain gives it back
    monkeypatch.setattr(broken, "synchronize", lambda: None)
    tt._drain_fences()
    assert pool.stats["used_bytes"] == 0 and not tt._fences


def test_fence_is_none_until_torch_uses_cuda() -> None:
    if torch.cuda.is_initialized():
        pytest.skip("torch has initialised CUDA in this process")
    assert tt._fence() is None


def test_forked_child_drops_the_parents_fences(module_pool: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tt, "_fence", FakeEvent)
    monkeypatch.setattr(tt, "_host_pinned", lambda pool: True)
    pool = module_pool.pool
    h = tuple(pool.lease(4096)[0])
    tt._release(pool, h, os.getpid())
    used = pool.stats["used_bytes"]
    pid = os.fork()
    if pid == 0:
        try:
            tt._fences[0][0].done = True
            tt._drain_fences(wait=True)  # a child must not give back the parent's blocks
        finally:
            os._exit(0 if not tt._fences else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert pool.stats["used_bytes"] == used and len(tt._fences) == 1
    tt._drain_fences(wait=True)
    assert pool.stats["used_bytes"] == 0

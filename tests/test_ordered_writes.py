"""The export's copy hands each piece to a writer thread while it reads the next: the file must hold
every byte in the order given, a failed write must surface in the caller, and nothing may still be
writing once the writer is closed."""

import os
import random
import threading

import pytest

from surgeon.core.donor import open_donor
from surgeon.core.plan import Plan, parse_spec
from surgeon.core.resolve import resolve
from surgeon.features import export as export_module
from surgeon.features.export import export_hybrid
from surgeon.io.aligned import aligned_buffer
from surgeon.io.ordered_writes import OrderedWriter, copy_buffers
from surgeon.live import threads


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "surgeon-write"]


def pieces(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randint(1, 5000)) for _ in range(count)]


@pytest.mark.parametrize("buffers", [1, 4])
def test_pieces_land_in_the_order_given_whichever_thread_writes_them(tmp_path, buffers):
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    writer = OrderedWriter(fd, [aligned_buffer(5000) for _ in range(buffers)])
    expected = b""
    try:
        for i, data in enumerate(pieces(0, 2000)):
            if i % 97 == 0:  # bytes made in memory (a header, a converted tensor) between copied pieces
                writer.write_now(data)
            else:
                buffer = writer.buffer()
                buffer[:len(data)] = data
                writer.write_from(buffer, buffer[:len(data)])
            expected += data
        writer.drain()
        assert len(writer_threads()) == (1 if buffers > 1 else 0)
    finally:
        writer.close()
        os.close(fd)
    assert path.read_bytes() == expected
    assert writer_threads() == []


def test_a_failed_write_is_raised_in_the_caller_and_close_stops_the_thread(tmp_path):
    path = tmp_path / "read-only"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)  # every write fails EBADF
    writer = OrderedWriter(fd, [aligned_buffer(100) for _ in range(4)])
    try:
        with pytest.raises(OSError):
            for _ in range(10):
                buffer = writer.buffer()  # a later piece may already see the first one's error
                writer.write_from(buffer, buffer[:10])
            writer.drain()
    finally:
        writer.close()  # raises nothing of its own
        os.close(fd)
    assert writer_threads() == []


def test_close_waits_for_the_pieces_still_pending(tmp_path):
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    writer = OrderedWriter(fd, copy_buffers(1 << 20, cores=2))
    data = pieces(1, 4)
    for piece in data:
        buffer = writer.buffer()
        buffer[:len(piece)] = piece
        writer.write_from(buffer, buffer[:len(piece)])
    writer.close()  # no drain: as after an error or a cancel elsewhere, before the descriptor closes
    os.close(fd)
    assert path.read_bytes() == b"".join(data)


def test_one_usable_core_copies_through_one_buffer():
    assert len(copy_buffers(4096, cores=1)) == 1
    assert len(copy_buffers(4096, cores=2)) > 1


@pytest.mark.parametrize("cores", [1, 2])
def test_an_export_writes_from_a_thread_only_when_a_second_core_can_run_it(donors_of, tmp_path, monkeypatch,
                                                                           cores):
    monkeypatch.setattr(export_module, "usable_cores", lambda: cores)
    monkeypatch.setattr(export_module, "spare_cores", lambda: cores)
    monkeypatch.setattr(export_module, "COPY_BUFFER", 1500)  # many pieces a tensor
    a, b = donors_of("olmoe", 2)
    donors = {"A": open_donor(a), "B": open_donor(b)}
    resolution = resolve(Plan("A", [parse_spec("experts", "B")]), donors)
    seen = []
    export_hybrid(resolution, donors, tmp_path / "out", progress=lambda step: seen.append(len(writer_threads())))
    assert max(seen) == (1 if cores > 1 else 0)
    assert writer_threads() == []
    reference = tmp_path / "reference"  # the same export, every write in turn
    monkeypatch.setattr(export_module, "usable_cores", lambda: 1)
    monkeypatch.setattr(export_module, "spare_cores", lambda: 1)
    export_hybrid(resolution, donors, reference)
    for shard in reference.glob("*.safetensors"):
        assert (tmp_path / "out" / shard.name).read_bytes() == shard.read_bytes()


def test_an_export_writes_in_turn_while_no_other_core_is_free(donors_of, tmp_path, monkeypatch):
    """Two usable cores, but the other one busy now (another process running): no writer thread,
    which would only take turns with the reader on one core."""
    monkeypatch.setattr(export_module, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "runnable_elsewhere", lambda: 1)
    monkeypatch.setattr(export_module, "COPY_BUFFER", 1500)
    a, b = donors_of("olmoe", 2)
    donors = {"A": open_donor(a), "B": open_donor(b)}
    resolution = resolve(Plan("A", [parse_spec("experts", "B")]), donors)
    seen = []
    export_hybrid(resolution, donors, tmp_path / "out", progress=lambda step: seen.append(len(writer_threads())))
    assert seen and max(seen) == 0


def test_the_threads_running_elsewhere_are_read_from_the_kernels_count(tmp_path, monkeypatch):
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("0.52 0.58 0.59 3/467 12345\n")  # 3 running or runnable, this thread among them
    assert threads.runnable_elsewhere(loadavg) == 2
    assert threads.runnable_elsewhere(tmp_path / "missing") is None
    loadavg.write_text("garbage\n")
    assert threads.runnable_elsewhere(loadavg) is None
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    for elsewhere, spare in ((None, 4), (0, 4), (1, 3), (3, 1), (9, 1)):
        monkeypatch.setattr(threads, "runnable_elsewhere", lambda: elsewhere)
        assert threads.spare_cores() == spare
    looks = iter([2, 2, 1, 2, 2])  # a moment's work elsewhere is not a competitor: the fewest count
    monkeypatch.setattr(threads, "runnable_elsewhere", lambda: next(looks))
    assert threads.spare_cores(apart=0) == 3


def test_a_writer_thread_that_fails_in_any_way_does_not_leave_the_caller_waiting():
    writer = OrderedWriter(None, [aligned_buffer(100) for _ in range(2)])  # os.write(None, ...): TypeError
    try:
        with pytest.raises(TypeError):
            for _ in range(5):  # more pieces than buffers: the caller waits for the thread's
                buffer = writer.buffer()
                writer.write_from(buffer, buffer[:10])
            writer.drain()
    finally:
        writer.close()
    assert writer_threads() == []

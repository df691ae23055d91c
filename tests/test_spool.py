"""PageSpool: a page map on local disk that behaves exactly like a dict of pages."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicad.spool import PageSpool

PAGE = 512

puts = st.lists(st.tuples(st.integers(1, 300), st.integers(0, 255)), max_size=400)


@settings(max_examples=60, deadline=None)
@given(puts, st.one_of(st.none(), st.integers(0, 320)))
def test_spool_matches_a_dict_newest_version_winning(
    ops: list[tuple[int, int]], upto: int | None
) -> None:
    model: dict[int, bytes] = {}
    with tempfile.TemporaryDirectory() as directory:
        spool = PageSpool(Path(directory), PAGE)
        for pgno, fill in ops:
            page = bytes([fill]) * PAGE
            spool.put(pgno, page)
            model[pgno] = page
        assert len(spool) == len(model)
        assert spool.nbytes == len(model) * PAGE
        assert spool.pgnos() == sorted(model)
        expected = [(p, model[p]) for p in sorted(model) if upto is None or p <= upto]
        assert list(spool.items(upto=upto)) == expected
        assert all(spool.get(p) == model[p] for p in model)
        assert spool.get(10_000) is None
        assert os.listdir(directory) == []  # unlinked from the start
        spool.close()
        assert len(spool) == 0


def test_put_run_takes_pages_out_of_wal_frames(tmp_path: Path) -> None:
    header = 24
    frames = b"".join(bytes(header) + bytes([i]) * PAGE for i in range(5))
    spool = PageSpool(tmp_path, PAGE)
    spool.put_run([7, 3, 7, 9, 3], memoryview(frames), header + PAGE, header)
    assert list(spool) == [(3, bytes([4]) * PAGE), (7, bytes([2]) * PAGE), (9, bytes([3]) * PAGE)]


def test_wrong_page_size_and_use_after_close_are_refused(tmp_path: Path) -> None:
    spool = PageSpool(tmp_path, PAGE)
    with pytest.raises(ValueError, match="not 512"):
        spool.put(1, b"short")
    spool.close()
    with pytest.raises(ValueError, match="closed"):
        spool.put(1, bytes(PAGE))


def test_close_from_another_thread_waits_for_the_write_in_progress(tmp_path: Path) -> None:
    """A cancelled task closes the spool while its worker thread may still be writing: the
    worker must then fail cleanly, never write to a descriptor number reused meanwhile.
    """
    spool = PageSpool(tmp_path, PAGE)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for pgno in range(1, 100_000):
                spool.put(pgno, bytes(PAGE))
        except ValueError as exc:
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    spool.close()
    other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT)  # may reuse the number
    thread.join()
    try:
        assert os.fstat(other).st_size == 0
    finally:
        os.close(other)
    assert len(errors) == 1

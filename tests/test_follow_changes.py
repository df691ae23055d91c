"""The follower folds an object's transactions into one write (`_Changes`): the pages to write
and where to cut the file first.  Applied to the state before the object, that must give
exactly the state after its last transaction, through any mix of growth and truncation.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from replicad.follow import _Changes, stamped_bytes, with_stamped
from replicad.format import Transaction, TxnInfo


@st.composite
def histories(draw: st.DrawFn) -> tuple[int, list[Transaction]]:
    """A starting size and transactions as SQLite makes them: a database that grows writes
    every new page in that transaction; it may shrink (VACUUM) to any size.
    """
    size = draw(st.integers(1, 12))
    start = size
    txns = []
    for txid in range(1, draw(st.integers(1, 6)) + 1):
        new_size = draw(st.integers(1, 16))
        grown = list(range(size + 1, new_size + 1))
        touched = draw(st.lists(st.integers(1, max(new_size, 1)), max_size=5))
        pages = [(p, bytes([txid, p])) for p in [*touched, *grown]]
        txns.append(Transaction(TxnInfo(txid, txid, new_size, len(pages)), pages))
        size = new_size
    return start, txns


def _model(start: int, txns: list[Transaction]) -> dict[int, bytes]:
    state = dict.fromkeys(range(1, start + 1), b"old")
    for txn in txns:
        for pgno, data in txn.pages:
            state[pgno] = data
        state = {p: d for p, d in state.items() if p <= txn.info.db_pages}
    return state


@given(histories())
def test_folded_changes_rebuild_the_final_state(history: tuple[int, list[Transaction]]) -> None:
    start, txns = history
    changes = _Changes(start)
    for txn in txns:
        changes.add(txn)
    out = dict.fromkeys(range(1, start + 1), b"old")
    if changes.truncate_to is not None:
        out = {p: d for p, d in out.items() if p <= changes.truncate_to}
    out.update(changes.sorted_pages())
    assert out == _model(start, txns)


def test_stamped_bytes_round_trip() -> None:
    page = bytes(range(256)) * 16
    other = bytes(4096)
    restored = with_stamped(other, stamped_bytes(page))
    assert stamped_bytes(restored) == stamped_bytes(page)
    assert restored[:24] == other[:24]
    assert restored[28:92] == other[28:92]
    assert restored[100:] == other[100:]

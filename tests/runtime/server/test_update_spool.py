"""A large incoming update goes to disk as it arrives and is mapped for its fold, so N concurrent uploads
of a big model cost the server page cache, not N x the model in memory; the job's next update rewrites
the same file in place; a small one reuses one buffer."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from runtime.aggregators import fold, start_sum
from runtime.errors import UpdateRejected
from runtime.server.update_spool import IncomingUpdate, SpoolFiles
from runtime.weights import check_update, to_bytes, view_bytes


def _update() -> bytes:
    return to_bytes({"w": np.arange(100_000, dtype=np.float32), "b": np.ones(3, np.float32)})


def _receive(data: bytes, spool: Path | SpoolFiles, free: list[bytearray], spool_above: int,
             sha: str = "") -> IncomingUpdate:
    files = spool if isinstance(spool, SpoolFiles) else SpoolFiles(spool)
    incoming = IncomingUpdate(len(data), 1 << 30, sha or hashlib.sha256(data).hexdigest(), files, free,
                              spool_above_bytes=spool_above)
    for start in range(0, len(data), 65536):
        incoming.receiver.add(data[start:start + 65536])
    return incoming


def test_a_large_update_is_spooled_to_disk_and_mapped_and_the_file_is_deleted_when_the_job_ends(
        tmp_path: Path) -> None:
    data, free, files = _update(), [], SpoolFiles(tmp_path)
    incoming = _receive(data, files, free, spool_above=1 << 10)
    (part,) = tmp_path.iterdir()
    assert part.stat().st_size == len(data) and part.stat().st_mode & 0o077 == 0
    payload = incoming.finish()
    assert not isinstance(payload, bytearray) and payload[:] == data  # a map of the file, not a copy
    weights = view_bytes(payload)
    np.testing.assert_array_equal(weights["w"], np.arange(100_000, dtype=np.float32))
    del weights
    incoming.release()
    assert free == [] and list(tmp_path.iterdir()) == [part]  # kept for the job's next update
    files.close()
    assert not list(tmp_path.iterdir())


def test_the_next_update_rewrites_the_same_file_in_place_and_ends_where_it_ends(tmp_path: Path) -> None:
    """Writing over pages the page cache holds costs a fraction of taking new ones: one file (one inode)
    serves update after update, and a shorter update leaves nothing of the longer one before it."""
    files = SpoolFiles(tmp_path)
    long = to_bytes({"w": np.arange(200_000, dtype=np.float32)})
    short = to_bytes({"w": np.full(50_000, 7, dtype=np.float32)})
    first = _receive(long, files, [], spool_above=1 << 10)
    (part,) = tmp_path.iterdir()
    inode = part.stat().st_ino
    assert first.finish()[:] == long
    first.release()
    second = _receive(short, files, [], spool_above=1 << 10)
    assert [p.stat().st_ino for p in tmp_path.iterdir()] == [inode]
    payload = second.finish()
    assert len(payload) == len(short) and payload[:] == short and part.stat().st_size == len(short)
    np.testing.assert_array_equal(view_bytes(payload)["w"], np.full(50_000, 7, dtype=np.float32))
    second.release()
    files.close()
    assert not list(tmp_path.iterdir())


def test_updates_in_flight_at_once_each_get_their_own_file_and_all_are_reused(tmp_path: Path) -> None:
    files, data = SpoolFiles(tmp_path), _update()
    a, b = _receive(data, files, [], 1 << 10), _receive(data, files, [], 1 << 10)
    assert len(list(tmp_path.iterdir())) == 2
    assert a.finish()[:] == b.finish()[:] == data
    a.release()
    b.release()
    c, d = _receive(data, files, [], 1 << 10), _receive(data, files, [], 1 << 10)
    assert len(list(tmp_path.iterdir())) == 2 and c.finish()[:] == d.finish()[:] == data
    c.release()
    files.close()
    d.release()  # given back after the job ended: deleted
    assert not list(tmp_path.iterdir())


def test_a_file_whose_map_is_still_viewed_is_rewritten_only_once_the_view_is_gone(tmp_path: Path) -> None:
    """A view that outlives its update (a reference cycle the garbage collector has not broken yet) must
    keep reading that update, never one written over it."""
    files = SpoolFiles(tmp_path)
    first_data = to_bytes({"w": np.arange(100_000, dtype=np.float32)})
    first = _receive(first_data, files, [], 1 << 10)
    late_view = view_bytes(first.finish())
    first.release()
    second = _receive(to_bytes({"w": np.zeros(100_000, dtype=np.float32)}), files, [], 1 << 10)
    assert len(list(tmp_path.iterdir())) == 2  # a new file: the viewed one waits
    second.finish()
    np.testing.assert_array_equal(late_view["w"], np.arange(100_000, dtype=np.float32))
    second.release()
    del late_view
    third, fourth = _receive(first_data, files, [], 1 << 10), _receive(first_data, files, [], 1 << 10)
    assert len(list(tmp_path.iterdir())) == 2  # both kept files serve again, the once-viewed one too
    assert third.finish()[:] == fourth.finish()[:] == first_data
    third.release()
    fourth.release()
    files.close()
    assert not list(tmp_path.iterdir())


def test_a_spooled_update_whose_hash_does_not_match_is_refused_and_its_file_rewritten_next(tmp_path: Path) -> None:
    files, data = SpoolFiles(tmp_path), _update()
    incoming = _receive(data, files, [], spool_above=1 << 10, sha="0" * 64)
    with pytest.raises(UpdateRejected, match="SHA-256"):
        incoming.finish()
    incoming.release()
    good = _receive(data, files, [], spool_above=1 << 10)
    assert good.finish()[:] == data
    good.release()
    files.close()
    assert not list(tmp_path.iterdir())


def test_small_updates_reuse_one_buffer_and_keep_no_more(tmp_path: Path) -> None:
    data, free = _update(), []
    first, second = _receive(data, tmp_path, free, 1 << 30), _receive(data, tmp_path, free, 1 << 30)
    a, b = first.finish(), second.finish()
    assert a == b == data and not list(tmp_path.iterdir())
    first.release()
    second.release()
    assert len(free) == 1  # at most one buffer waits for the next update
    third = _receive(data, tmp_path, free, 1 << 30)
    assert third.finish() is a and free == []  # filled in place


def _rss_file_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssFile in /proc/self/status (not Linux)")


def test_releasing_a_spooled_update_drops_its_pages_even_while_a_view_of_it_lives_on(tmp_path: Path) -> None:
    """asyncio's thread futures keep the folded SiteResult (views of the map) in a reference cycle until
    the garbage collector runs, so the map cannot be closed at release: its pages must leave the
    server's memory anyway, or the whole update stays resident through the round's close."""
    n = 16 << 20  # float32 values: 64 MiB
    data = to_bytes({"w": np.arange(n, dtype=np.float32)})
    incoming = _receive(data, tmp_path, [], spool_above=1 << 10)
    weights = view_bytes(incoming.finish())
    assert float(weights["w"].sum(dtype=np.float64)) == n * (n - 1) / 2  # every page touched: resident
    resident = _rss_file_bytes()
    incoming.release()  # a view is alive: the map stays open
    dropped = resident - _rss_file_bytes()
    assert dropped > (48 << 20), f"only {dropped >> 20} MiB of the 64 MiB update left the process's memory"
    assert weights["w"][n - 1] == n - 1  # a late reader still reads it


def test_checking_and_folding_a_spooled_update_holds_one_tensor_of_it_at_a_time(tmp_path: Path) -> None:
    """The server's peak is the model, the running sum and what it holds of the update being folded:
    the NaN check and the fold each let a tensor's pages go once read, so that is one tensor, not the
    whole update (16 tensors of 4 MiB here)."""
    n_tensors, n = 16, 1 << 20  # float32 values per tensor: 4 MiB
    update = {f"t{i:02d}": np.full(n, i, dtype=np.float32) for i in range(n_tensors)}
    model = {k: np.zeros(n, np.float32) for k in update}
    acc = start_sum(model)
    incoming = _receive(to_bytes(update), tmp_path, [], spool_above=1 << 10)
    weights = view_bytes(incoming.finish())
    before = _rss_file_bytes()
    grew = 0

    check_update(weights, model)
    grew = max(grew, _rss_file_bytes() - before)
    fold(acc, weights, 2.0)
    grew = max(grew, _rss_file_bytes() - before)

    assert grew < (12 << 20), f"{grew >> 20} MiB of the 64 MiB update stayed resident"
    for i in range(n_tensors):  # and nothing was lost: the sum is right, the views still read
        assert acc.sums[f"t{i:02d}"][-1] == 2.0 * i and weights[f"t{i:02d}"][0] == i
    incoming.release()

"""Many pages and many threads: no fds or mappings per idle page, no leak, no error. For
pages with files of their own and for packed pages alike (the `packing` fixture)."""

import os
import random
import threading

import pytest

from diskpages import PageCache, PageReleasedError

from conftest import page_count_on_disk, page_files_on_disk, segment_count, slot_ids_on_disk

pytestmark = pytest.mark.usefixtures("packing")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def mappings(path=None) -> int:
    """Lines of /proc/self/maps (those naming a file under ``path``, if given: the total
    also moves with the heap, whose regions merge and split)."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if path is None or str(path) in line)


def test_ten_thousand_live_pages_hold_no_fds_or_mappings(cache):
    fds, maps = open_fds(), mappings()
    pages = cache.write_many([b"x" * 64] * 5000) + [cache.write(b"y") for _ in range(5000)]
    builder_pages = []
    for _ in range(100):
        b = cache.allocate(4096)
        b.view()[:1] = b"b"
        builder_pages.append(b.seal())
    assert open_fds() - fds < 5
    assert mappings() - maps < 50
    assert cache.stats().live_pages == 10_100
    # views hold a mapping each while they live, and never an fd
    views = [p.view() for p in pages[:2000]]
    assert open_fds() - fds < 5
    # (and the cache maps each segment's tags: one mapping per segment, not per page)
    assert mappings(cache.path) == 2000 + segment_count(cache)
    del views
    assert mappings() - maps < 50
    del pages, builder_pages
    cache.remove_released()
    assert page_count_on_disk(cache) == 0


def test_eight_threads_write_read_drop(root):
    n_threads, rounds = 8, 250
    errors: list[BaseException] = []
    kept: list = []
    kept_lock = threading.Lock()
    start = threading.Barrier(n_threads)
    with PageCache(root, batch=16, max_delay=0.01) as cache:

        def work(seed: int) -> None:
            rng = random.Random(seed)
            mine = []
            try:
                start.wait()
                for i in range(rounds):
                    data = rng.randbytes(rng.choice([0, 1, 100, 4096, 70000]))
                    page = cache.write(data) if i % 5 else cache.write_many([data, data])[1]
                    assert page.read() == data
                    assert page.view() == data
                    choice = rng.random()
                    if choice < 0.2:
                        mine.append(page)
                        with kept_lock:
                            kept.append(page)  # from now on other threads may release it
                    elif choice < 0.4:
                        page.release()
                    elif choice < 0.5:
                        cycle = [page]
                        cycle.append(cycle)
                    elif choice < 0.6:
                        b = cache.allocate(len(data))
                        b.view()[:] = data
                        sealed = b.seal()
                        mine.append(sealed)
                        with kept_lock:
                            kept.append(sealed)
                    if mine:
                        # read one of ours, which another thread may be releasing right now
                        p = rng.choice(mine)
                        try:
                            assert len(p.read()) == p.nbytes
                            assert len(p.view()) == p.nbytes
                        except PageReleasedError:
                            assert p.released
                    if mine and rng.random() < 0.1:
                        # release another thread's page while it may be reading it
                        with kept_lock:
                            victim = kept[rng.randrange(len(kept))] if kept else None
                        if victim is not None:
                            victim.release()
                            try:
                                victim.read()
                            except PageReleasedError:
                                pass
                            else:
                                raise AssertionError("read a released page")
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(s,)) for s in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        cache.collect()
        live = [p for p in kept if not p.released]
        s = cache.stats()
        assert s.pending == 0 and s.remove_errors == 0
        assert s.live_pages == len(live)
        assert s.live_bytes == sum(p.nbytes for p in live)
        assert s.removed == s.written - len(live)
        assert page_files_on_disk(cache) == {p.path.name for p in live if not p.packed}
        assert slot_ids_on_disk(cache) == {p.id for p in live if p.packed}
        for p in live:
            p.read()
    assert not cache.path.exists()

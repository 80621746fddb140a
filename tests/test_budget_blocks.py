"""The budget counts blocks, not payload: a page is charged what it makes the cache hold on
disk (its whole slot if packed, its file's whole 4 KiB blocks otherwise, one at least), so
``max_bytes`` bounds what ``du`` sees in the cache's folder, give or take one growth chunk
and the tags of each segment. And a page's bytes held anywhere are counted somewhere:
handed-over names in the writer's stats(), a borrower's views against the owner's budget."""

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from diskpages import CacheFullError, PageCache, PageLostError

from conftest import wait_until

pytestmark = pytest.mark.lifetime  # also under AddressSanitizer in CI (.ci/asan)

KiB, MiB = 1024, 1024 * 1024
GROW = MiB  # csrc/segment.h: GROW_BYTES, the most a segment grows by at once


def du(folder: Path) -> int:
    """What the folder holds on disk, as du counts it: its blocks and its files'."""
    total = os.stat(folder).st_blocks * 512
    for entry in os.scandir(folder):
        try:
            total += entry.stat(follow_symlinks=False).st_blocks * 512
        except FileNotFoundError:  # removed by the reaper meanwhile
            pass
    return total


def tag_bytes(folder: Path) -> int:
    """Blocks of the tags of each segment (32 bytes per slot, written as slots are used)."""
    total = 0
    for entry in os.scandir(folder):
        if entry.name.endswith(".slots"):
            slots = max(0, entry.stat().st_size - 32 * MiB) // int(entry.name.removesuffix(".slots"))
            total += -(-slots * 32 // 4096) * 4096
    return total


@pytest.mark.parametrize(
    "nbytes, pack_max, charge",
    [
        (0, None, 4 * KiB),  # an empty packed page takes a 4 KiB slot
        (1, None, 4 * KiB),
        (4 * KiB, None, 4 * KiB),
        (4 * KiB + 1, None, 8 * KiB),
        (0, 0, 4 * KiB),  # an empty file: no data block, but an inode and an entry
        (1, 0, 4 * KiB),
        (MiB, 0, MiB),
        (MiB + 1, 0, MiB + 4 * KiB),
    ],
)
def test_a_page_is_charged_what_it_takes_on_disk(tmp_path, nbytes, pack_max, charge):
    with PageCache(tmp_path, pack_max=pack_max) as cache:
        pages = [cache.write(b"x" * nbytes) for _ in range(3)]
        s = cache.stats()
        assert (s.live_pages, s.live_bytes) == (3, 3 * nbytes)
        assert s.live_disk_bytes == s.charged_bytes == 3 * charge
        pages[0].release()
        s = cache.stats()
        assert s.pending_disk_bytes == charge and s.live_disk_bytes == 2 * charge
        cache.remove_released()
        assert cache.stats().charged_bytes == 2 * charge


def test_empty_pages_fill_the_budget(tmp_path):
    """20,000 empty pages under 64 KiB used to leave 83 MB on disk."""
    with PageCache(tmp_path, max_bytes=64 * KiB, collect_when_full=False) as cache:
        pages = []
        with pytest.raises(CacheFullError, match="0 bytes"):
            for _ in range(20_000):
                pages.append(cache.write(b""))
        assert len(pages) == 16
        assert du(cache.path) <= 64 * KiB + GROW + tag_bytes(cache.path) + 4 * KiB


@pytest.mark.parametrize("nbytes", [0, 1, 4 * KiB, MiB])
@pytest.mark.parametrize("pack_max", [None, 0])
def test_max_bytes_bounds_what_du_sees(tmp_path, nbytes, pack_max):
    budget = 4 * MiB
    with PageCache(tmp_path, max_bytes=budget, pack_max=pack_max, collect_when_full=False) as cache:
        pages = []
        with pytest.raises(CacheFullError):
            for _ in range(100_000):
                pages.append(cache.write(b"\1" * nbytes))
        segments = sum(name.endswith(".slots") for name in os.listdir(cache.path))
        extra = tag_bytes(cache.path) + os.stat(cache.path).st_blocks * 512
        assert du(cache.path) <= budget + segments * GROW + extra, cache.stats()
        # Churn: what is released stays charged until removed, and under a budget the
        # reaper gives freed slots' blocks back down to a chunk each tick; a slot freed
        # since, or being given back, may hold blocks meanwhile: a second chunk at most.
        peak = 0
        for _ in range(4):
            live = [p for p in pages if not p.released]
            for page in live[::2]:
                page.release()
            for _ in range(len(live) // 2):
                try:
                    pages.append(cache.write(b"\2" * nbytes))
                except CacheFullError:
                    cache.remove_released()
                peak = max(peak, du(cache.path))
            assert cache.stats().charged_bytes <= budget
        segments = sum(name.endswith(".slots") for name in os.listdir(cache.path))
        extra = tag_bytes(cache.path) + os.stat(cache.path).st_blocks * 512
        # (a third chunk's grace: the reaper gives blocks back on its ticks, later on a
        # machine that starves it of CPU, as the AddressSanitizer stage under load did)
        assert peak <= budget + 3 * segments * GROW + extra, cache.stats()


def test_handed_names_are_in_the_writers_stats_until_adopted(tmp_path):
    with PageCache(tmp_path / "a", pack_max=0) as writer, PageCache(tmp_path / "b") as reader:
        page = writer.write(b"h" * 10_000)
        packed = PageCache(tmp_path / "c")
        small = packed.write(b"s" * 100)
        handles = [page.hand_over(), page.hand_over()]
        s = writer.stats()
        assert (s.handed, s.handed_bytes) == (2, 20_000)
        del page  # the handed names outlive the page
        writer.remove_released()
        assert writer.stats().handed == 2
        adopted = reader.adopt(pickle.loads(pickle.dumps(handles[0])))
        assert adopted.read() == b"h" * 10_000
        assert (writer.stats().handed, writer.stats().handed_bytes) == (1, 10_000)
        small_handle = small.hand_over()
        assert (packed.stats().handed, packed.stats().handed_bytes) == (1, 100)
        reader.adopt(small_handle)
        assert packed.stats().handed == 0
        packed.close()
    assert writer.stats().handed == 0  # closed: the names went with the folder


def test_a_borrowers_view_counts_against_the_owners_budget(tmp_path):
    """Views taken through a pickled page file hold its bytes on disk after the owner
    released it: they stay in the owner's stats() and max_bytes until they die."""
    with PageCache(tmp_path, max_bytes=10 * MiB, pack_max=0, max_delay=0.01) as cache:
        page = cache.write(b"b" * (6 * MiB))
        borrowed = pickle.loads(pickle.dumps(page))
        view = borrowed.view()
        array_like = view[10:20]
        del view
        page.release()
        cache.remove_released()
        s = cache.stats()
        assert (s.pinned, s.pinned_bytes) == (1, 6 * MiB) and s.charged_bytes >= 6 * MiB
        with pytest.raises(CacheFullError, match="held by views"):
            cache.write(b"n" * (5 * MiB))
        assert bytes(array_like) == b"b" * 10  # still readable
        del array_like  # the last view of it: the reaper sees the lock go
        assert wait_until(lambda: cache.stats().pinned == 0)
        assert cache.stats().charged_bytes == 0
        cache.write(b"n" * (5 * MiB))


def test_a_view_in_another_process_counts_against_the_owners_budget(tmp_path):
    with PageCache(tmp_path, max_bytes=10 * MiB, pack_max=0, max_delay=0.01) as cache:
        page = cache.write(b"p" * (6 * MiB))
        handle = tmp_path / "page.pickle"
        handle.write_bytes(pickle.dumps(page))
        ready, done = tmp_path / "ready", tmp_path / "done"
        proc_code = f"""
            import pickle, time
            from pathlib import Path
            page = pickle.loads(Path({str(handle)!r}).read_bytes())
            view = page.view()
            Path({str(ready)!r}).touch()
            while not Path({str(done)!r}).exists():
                time.sleep(0.01)
            assert bytes(view[:3]) == b"ppp"
        """
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(proc_code)])
        try:
            assert wait_until(ready.exists, timeout=30)
            page.release()
            cache.remove_released()
            assert cache.stats().pinned_bytes == 6 * MiB
            with pytest.raises(CacheFullError):
                cache.write(b"n" * (5 * MiB))
        finally:
            done.touch()
            assert child.wait(30) == 0
        assert wait_until(lambda: cache.stats().pinned == 0)
        cache.write(b"n" * (5 * MiB))


def test_a_borrower_cannot_view_a_page_its_owner_removed(tmp_path):
    with PageCache(tmp_path, pack_max=0) as cache:
        page = cache.write(b"g" * 10_000)
        borrowed = pickle.loads(pickle.dumps(page))
        page.release()
        cache.remove_released()
        with pytest.raises(PageLostError):
            borrowed.view()


def test_a_view_through_a_handed_over_page_counts_where_it_was_adopted(tmp_path):
    with (
        PageCache(tmp_path / "w", pack_max=0) as writer,
        PageCache(tmp_path / "r", pack_max=0, max_bytes=4 * MiB, max_delay=0.01) as receiver,
    ):
        page = writer.write(b"h" * (3 * MiB))
        handle = pickle.loads(pickle.dumps(page.hand_over()))
        view = handle.view()  # a borrower's view of the handed name
        del page
        writer.remove_released()
        adopted = receiver.adopt(handle)  # the same file, linked
        del adopted
        receiver.remove_released()
        assert receiver.stats().pinned_bytes == 3 * MiB
        with pytest.raises(CacheFullError, match="held by views"):
            receiver.write(b"z" * (2 * MiB))
        del view
        assert wait_until(lambda: receiver.stats().pinned == 0)


def test_a_view_of_an_adopted_link_does_not_pin_the_original(tmp_path):
    """Both names are one file: the view holds nothing the original's removal frees."""
    with PageCache(tmp_path, pack_max=0) as cache:
        original = cache.write(b"o" * 10_000)
        pickle.dumps(original)  # shared: its removal looks for views
        adopted = cache.adopt(original)
        view = pickle.loads(pickle.dumps(adopted)).view()
        original.release()
        cache.remove_released()
        assert cache.stats().pinned == 0
        assert bytes(view[:1]) == b"o"


def test_a_borrowers_view_on_overlayfs_counts(tmp_path):
    """overlayfs maps the file under it, so a mapping does not keep the overlay file's OFD
    lock: the view keeps the fd it locked with instead."""
    if os.geteuid() != 0:
        pytest.skip("mounting an overlay needs root")
    for d in ("lower", "upper", "work", "merged"):
        (tmp_path / d).mkdir()
    merged = tmp_path / "merged"
    opts = f"lowerdir={tmp_path}/lower,upperdir={tmp_path}/upper,workdir={tmp_path}/work"
    if subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)]).returncode:
        pytest.skip("no overlayfs here")
    try:
        merged.chmod(0o700)
        with PageCache(merged / "root", pack_max=0, max_bytes=2 * MiB, max_delay=0.01) as cache:
            page = cache.write(b"x" * MiB)
            view = pickle.loads(pickle.dumps(page)).view()
            page.release()
            cache.remove_released()
            assert cache.stats().pinned_bytes == MiB
            del view
            assert wait_until(lambda: cache.stats().pinned == 0)
    finally:
        subprocess.run(["umount", str(merged)])


def test_rewriting_scattered_slots_while_the_reaper_punches_them_keeps_du_in_max_bytes(tmp_path):
    """Every other page of 60,000 dropped leaves 30,000 one-slot runs to punch (~150 us
    each on a disk mounted `discard`, seconds in all). The reaper reserves only the run it
    punches, so writers rewriting the pages reuse the other freed slots instead of growing
    the segment: it once reserved the whole list, and the folder passed max_bytes by what
    the writers wrote meanwhile (90 MiB over 800 with 200,000 pages)."""
    n, page = 60_000, b"r" * (4 * KiB)
    budget = n * 4 * KiB + 4 * MiB
    with PageCache(tmp_path, max_bytes=budget, collect_when_full=False) as cache:
        pages = []
        while len(pages) < n:
            pages += cache.write_many([page] * min(4096, n - len(pages)))
        del pages[::2]
        cache.remove_released()
        peak = 0
        while len(pages) < n:
            pages += cache.write_many([page] * min(256, n - len(pages)))
            peak = max(peak, du(cache.path))
        extra = tag_bytes(cache.path) + os.stat(cache.path).st_blocks * 512
        assert peak <= budget + 2 * GROW + extra, (peak, cache.stats())
        assert all(p.read() == page for p in pages[::997])

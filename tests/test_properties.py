"""Round trips as properties: any bytes in, the same bytes out, through every write path,
as page files and as packed pages."""

import pickle

from hypothesis import given, settings
from hypothesis import strategies as st

from diskpages import PageCache

blobs = st.binary(max_size=20_000)


def on_disk(page) -> bytes:
    """The page's bytes as another process would read them: its file, or its slot."""
    if page.packed:
        return pickle.loads(pickle.dumps(page)).read()  # the segment, at the slot, by path
    return page.path.read_bytes()


# packed: the default pack_max (every blob here fits a slot); else 0, a file per page
@settings(max_examples=60, deadline=None)
@given(data=blobs, packed=st.booleans())
def test_write_round_trip(tmp_path_factory, data, packed):
    with PageCache(tmp_path_factory.getbasetemp() / "prop", pack_max=None if packed else 0) as cache:
        page = cache.write(data)
        assert page.packed == packed or not data  # (an empty page: test_api's test_empty_page)
        assert page.read() == data
        assert page.view() == data
        assert on_disk(page) == data


@settings(max_examples=40, deadline=None)
@given(datas=st.lists(blobs, max_size=8), packed=st.booleans())
def test_write_many_round_trip(tmp_path_factory, datas, packed):
    with PageCache(tmp_path_factory.getbasetemp() / "prop", pack_max=None if packed else 0) as cache:
        pages = cache.write_many(datas)
        assert [p.read() for p in pages] == datas
        assert [on_disk(p) for p in pages] == datas


@settings(max_examples=40, deadline=None)
@given(data=blobs)
def test_builder_round_trip(tmp_path_factory, data):
    with PageCache(tmp_path_factory.getbasetemp() / "prop") as cache:
        builder = cache.allocate(len(data))
        builder.view()[:] = data
        page = builder.seal()
        assert page.read() == data
        assert page.path.stat().st_size == len(data)

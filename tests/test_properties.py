"""Round trips as properties: any bytes in, the same bytes out, through every write path."""

from hypothesis import given, settings
from hypothesis import strategies as st

from diskpages import PageCache

blobs = st.binary(max_size=20_000)


@settings(max_examples=60, deadline=None)
@given(data=blobs)
def test_write_round_trip(tmp_path_factory, data):
    with PageCache(tmp_path_factory.getbasetemp() / "prop") as cache:
        page = cache.write(data)
        assert page.read() == data
        assert page.view() == data
        assert page.path.read_bytes() == data


@settings(max_examples=40, deadline=None)
@given(datas=st.lists(blobs, max_size=8))
def test_write_many_round_trip(tmp_path_factory, datas):
    with PageCache(tmp_path_factory.getbasetemp() / "prop") as cache:
        pages = cache.write_many(datas)
        assert [p.read() for p in pages] == datas


@settings(max_examples=40, deadline=None)
@given(data=blobs)
def test_builder_round_trip(tmp_path_factory, data):
    with PageCache(tmp_path_factory.getbasetemp() / "prop") as cache:
        builder = cache.allocate(len(data))
        builder.view()[:] = data
        page = builder.seal()
        assert page.read() == data
        assert page.path.stat().st_size == len(data)

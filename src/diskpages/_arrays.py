"""NumPy arrays as pages, each a complete .npy file.

An array page is a complete .npy file: numpy.lib.format's header
(format 1.0, or 2.0 when the header outgrows 1.0), then the data, so
``numpy.load(page.path, mmap_mode="r")`` opens it and ``array()`` views it in place.

NumPy is optional: it is imported on first use, never when diskpages is imported, and its
absence is an ImportError that names the extra that installs it. Arrays that hold Python
objects are refused: a .npy file would need a pickle, and diskpages never writes one.
"""

from __future__ import annotations

import io
import math
import operator
import tokenize
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    import numpy

_Page_co = TypeVar("_Page_co", covariant=True)


class Builder(Protocol[_Page_co]):
    """What arrays need of a page being written in place (a PageBuilder)."""

    def _write_at(self, data: Any, offset: int) -> int: ...
    def _discard(self) -> None: ...
    def seal(self) -> _Page_co: ...
    def view(self) -> memoryview: ...


_Builder_co = TypeVar("_Builder_co", bound=Builder[Any], covariant=True)
_Page = TypeVar("_Page")
_Built = TypeVar("_Built", bound=Builder[Any])


class Allocator(Protocol[_Builder_co]):
    """What arrays need of a cache: builders (``PageCache.allocate()``)."""

    def allocate(self, nbytes: int) -> _Builder_co: ...


class Viewable(Protocol):
    """What ``array_of()`` needs of a page or a builder: its id and a view of its bytes."""

    @property
    def id(self) -> int: ...
    def view(self) -> memoryview: ...


NEEDS_NUMPY = 'arrays need NumPy: pip install "diskpages[numpy]"'


def _numpy() -> Any:
    try:
        import numpy
        import numpy.lib.format  # not loaded by "import numpy" in every version
    except ImportError as exc:
        raise ImportError(NEEDS_NUMPY, name="numpy") from exc
    return numpy


def _refuse_objects(dtype: numpy.dtype) -> None:
    if dtype.hasobject:
        raise TypeError(
            f"an array of dtype {dtype} holds Python objects; a .npy page would need a pickle, "
            "and diskpages never writes pickles"
        )


def _header(np: Any, dtype: numpy.dtype, fields: dict[str, Any]) -> bytes:
    """The .npy header for ``fields`` (descr, fortran_order, shape), in the lowest format
    version that holds it, made by numpy.lib.format's own writers."""
    fmt = np.lib.format
    if fmt.descr_to_dtype(fields["descr"]) != dtype:  # numpy would write "|O" and a pickle
        raise TypeError(f"dtype {dtype} cannot be stored in a .npy header without a pickle")
    try:
        try:
            out = io.BytesIO()
            fmt.write_array_header_1_0(out, fields)
        except ValueError:  # a header over 64 KiB (thousands of fields) needs format 2.0
            out = io.BytesIO()
            fmt.write_array_header_2_0(out, fields)
    except UnicodeEncodeError:
        # Formats 1.0 and 2.0 are latin-1; 3.0 (UTF-8) has no public writer in numpy.lib.format.
        raise ValueError(
            f"the field names of dtype {dtype} are not latin-1, which needs .npy format 3.0; "
            "diskpages writes 1.0 and 2.0 only"
        ) from None
    return out.getvalue()


def _c_order_header(np: Any, dtype: numpy.dtype, shape: tuple[int, ...]) -> bytes:
    fields = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    return _header(np, dtype, fields)


def as_array(data: Any) -> numpy.ndarray:
    """``numpy.asarray(data)``, refused if it holds Python objects."""
    array: numpy.ndarray = _numpy().asarray(data)
    _refuse_objects(array.dtype)
    return array


def is_strided(array: numpy.ndarray) -> bool:
    """Whether the array has bytes to write and they are neither C- nor Fortran-contiguous
    (an array with no bytes counts as contiguous)."""
    flags = array.flags
    return bool(array.size and array.dtype.itemsize) and not (flags.c_contiguous or flags.f_contiguous)


def npy_parts(array: numpy.ndarray) -> tuple[bytes, Any]:
    """The header and a bytes-like object over a C- or Fortran-contiguous array's own
    memory, in file order (the header says fortran_order)."""
    np = _numpy()
    fields = np.lib.format.header_data_from_array_1_0(array)  # fortran_order from the flags
    header = _header(np, array.dtype, fields)
    if array.dtype.itemsize == 0 or array.size == 0:
        return header, b""
    ordered = array.T if fields["fortran_order"] else array
    # As bytes: every dtype exports a uint8 buffer (datetime64 has no buffer of its own).
    return header, ordered.reshape(-1).view(np.uint8)


# A strided array is written in C-ordered pieces of at most this many bytes.
CHUNK = 16 << 20


def _c_order_pieces(np: Any, array: numpy.ndarray, limit: int) -> Iterator[numpy.ndarray]:
    """Contiguous copies of consecutive pieces of ``array`` in C order, each at most
    ``limit`` bytes (or a single element): split along the first axis, and below it where
    one index of that axis is already too big."""
    if array.nbytes <= limit or array.ndim == 0:
        yield np.ascontiguousarray(array)
        return
    per = max(1, limit // (array.nbytes // array.shape[0]))
    for i in range(0, array.shape[0], per):
        if per == 1 and array.ndim > 1:
            yield from _c_order_pieces(np, array[i], limit)
        else:
            yield np.ascontiguousarray(array[i : i + per])


def write_strided(cache: Allocator[Builder[_Page]], array: numpy.ndarray) -> _Page:
    """An array that is neither C- nor Fortran-contiguous, written in C order in pieces of
    at most CHUNK bytes with pwrite into a new page (as numpy.save does): never copied
    whole into memory, since it may be a slice of a memmap larger than memory; and never
    stored through a mapping, which on a file system without fallocate could be SIGBUS.
    On any error the page is discarded at once: its fd and file go, its bytes leave the
    budget with the next removal."""
    np = _numpy()
    header = _c_order_header(np, array.dtype, array.shape)
    builder = cache.allocate(len(header) + array.nbytes)
    try:
        offset = builder._write_at(header, 0)
        for piece in _c_order_pieces(np, array, CHUNK):
            offset += builder._write_at(piece.reshape(-1).view(np.uint8), offset)
        return builder.seal()
    except BaseException:
        builder._discard()
        raise


def _shape(shape: Any) -> tuple[int, ...]:
    """An int or a sequence of ints (bools refused, as PageCache refuses them elsewhere)."""
    try:
        items = [shape] if hasattr(shape, "__index__") else list(shape)
    except TypeError:
        items = [None]
    if any(isinstance(n, bool) or not hasattr(n, "__index__") for n in items):
        raise TypeError(f"shape must be an int or a sequence of ints, not {shape!r}")
    dims = tuple(operator.index(n) for n in items)
    if any(n < 0 for n in dims):
        raise ValueError(f"shape must not have negative dimensions: {shape!r}")
    return dims


def allocate_array(cache: Allocator[_Built], shape: Any, dtype: Any) -> _Built:
    np = _numpy()
    dims = _shape(shape)
    dtype = np.dtype(dtype)  # TypeError for what is not a dtype
    if dtype.subdtype is not None:  # as numpy.empty does: ("f8", (3,)) adds a dimension
        dtype, dims = dtype.base, dims + dtype.shape
    _refuse_objects(dtype)
    header = _c_order_header(np, dtype, dims)
    nbytes = math.prod(dims) * dtype.itemsize
    if len(header) + nbytes > 2**63 - 1:
        raise ValueError(f"an array of shape {dims} and dtype {dtype} is too large for a page")
    builder = cache.allocate(len(header) + nbytes)
    with builder.view() as view:
        view[: len(header)] = header
    return builder


class _Reader:
    """The file-like read() that numpy.lib.format's header readers call, over a memoryview:
    it copies only what they read, never the data."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.pos = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.view) if size < 0 else min(self.pos + size, len(self.view))
        chunk = bytes(self.view[self.pos : end])
        self.pos = end
        return chunk


# What numpy.lib.format's header reader raises, besides ValueError, for a header that is not
# a valid one (each seen with a hostile page; see tests/test_arrays.py):
# - tokenize.TokenError, SyntaxError (IndentationError too): numpy retries a header that
#   literal_eval refuses with tokenize (for Python 2's "1L"), and numpy.dtype parses a descr
#   such as "(3,)f8" with literal_eval;
# - TypeError, IndexError: literal_eval makes a dict with a list for a key; descr_to_dtype
#   indexes a tuple descr;
# - RecursionError, MemoryError: a few KB of "1+1+..." or "---...1" nest deeper than ast, or
#   CPython 3.11's parser stack, allows. The header is read from a page that is already
#   mapped, so a MemoryError here is that limit far more likely than memory running out;
#   it stays chained as the cause all the same.
_BAD_HEADER = (SyntaxError, tokenize.TokenError, TypeError, IndexError, RecursionError, MemoryError)


def _read_header(np: Any, reader: _Reader, nbytes: int) -> tuple[tuple[int, ...], bool, numpy.dtype]:
    """(shape, fortran_order, dtype) from the .npy header at the reader; ValueError (or one of
    _BAD_HEADER) if there is none."""
    fmt = np.lib.format
    version = fmt.read_magic(reader)
    # The page is this process's own file, so a header of any size is read (numpy.load
    # caps it at 10,000 characters against hostile files).
    if version == (1, 0):
        shape, fortran_order, dtype = fmt.read_array_header_1_0(reader, max_header_size=nbytes)
    elif version == (2, 0):
        shape, fortran_order, dtype = fmt.read_array_header_2_0(reader, max_header_size=nbytes)
    else:
        raise ValueError(f"format version {version[0]}.{version[1]} is not supported (1.0 and 2.0 are)")
    # numpy checks only that each size is an int: a bool is one, and so is a negative int
    if any(isinstance(n, bool) or n < 0 for n in shape):
        raise ValueError(f"shape is not valid: {shape!r}")
    return shape, fortran_order, dtype


def array_of(owner: Viewable) -> numpy.ndarray:
    """The array a .npy page holds, over ``owner.view()``: no copy, read-only for a Page,
    writable for a PageBuilder. The array holds an export of the view's mapping, so the
    mapping lives (and a builder cannot be sealed) while the array does."""
    np = _numpy()
    view = owner.view()
    reader = _Reader(view)
    not_npy = f"page {owner.id} is not a .npy array"
    if bytes(view[: len(np.lib.format.MAGIC_PREFIX)]) != np.lib.format.MAGIC_PREFIX:
        raise ValueError(
            f"{not_npy}: its bytes do not start with a .npy header. write_array() and "
            "allocate_array() make array pages; write() and allocate() keep raw bytes, which "
            "numpy.frombuffer(page.view(), dtype) reads as an array"
        )
    try:
        shape, fortran_order, dtype = _read_header(np, reader, len(view))
    except ValueError as exc:
        raise ValueError(f"{not_npy}: {exc}") from None
    except _BAD_HEADER as exc:
        raise ValueError(f"{not_npy}: its header does not parse ({type(exc).__name__}: {exc})") from exc
    if dtype.hasobject:
        raise ValueError(f"page {owner.id} holds a pickled object array, which diskpages never loads")
    count = math.prod(shape)
    if reader.pos + count * dtype.itemsize != len(view):
        raise ValueError(
            f"{not_npy}: its header says {count * dtype.itemsize} bytes "
            f"of data, the page has {len(view) - reader.pos}"
        )
    order = "F" if fortran_order else "C"
    try:
        if dtype.itemsize == 0:  # nothing to map; numpy.frombuffer refuses such dtypes
            array: numpy.ndarray = np.empty(shape, dtype, order=order)
            array.flags.writeable = not view.readonly
            return array
        # frombuffer, not ndarray(buffer=...): only frombuffer keeps an export of the mapping.
        flat = np.frombuffer(view, dtype=dtype, count=count, offset=reader.pos)
        shaped: numpy.ndarray = flat.reshape(shape, order=order)
        return shaped
    except ValueError as exc:  # a shape numpy cannot hold: a size over intp, over 64 dimensions
        raise ValueError(f"{not_npy}: {exc}") from None


def as_numpy(array: numpy.ndarray, dtype: Any, copy: bool | None, page_id: int) -> numpy.ndarray:
    """NumPy's array protocol (``__array__``, NumPy 2's ``copy`` included) for page
    ``page_id``, whose ``array()`` is ``array``: that array as it is, read-only and
    zero-copy; a writable copy if ``copy`` is true or ``dtype`` differs (ValueError then
    if ``copy`` is False)."""
    np = _numpy()
    if dtype is not None and np.dtype(dtype) != array.dtype:
        if copy is False:
            raise ValueError(
                f"page {page_id} holds {array.dtype}: giving {np.dtype(dtype)} needs a copy, "
                "and copy=False was asked"
            )
        return array.astype(dtype)
    return array.copy(order="K") if copy else array

"""The cffi build script (API mode): compiles csrc/*.c into ``diskpages._native``.

setup.py names it in ``cffi_modules``; ``python csrc/build_ffi.py`` compiles it in place
(into src/diskpages/) for quick work on the C code. The C API is csrc/diskpages.h, read
verbatim as the cdef, so the binding cannot drift from the C.
"""

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HEADER = HERE / "diskpages.h"


def _sources(relative: bool) -> list[str]:
    # setuptools wants paths relative to setup.py; ffibuilder.compile() changes directory,
    # so the in-place build below needs them absolute.
    paths = sorted(HERE.glob("*.c"))
    return [os.path.relpath(p, ROOT) if relative else str(p) for p in paths]


def make_builder(relative: bool = True) -> FFI:
    ffi = FFI()
    ffi.cdef(HEADER.read_text())
    ffi.set_source(
        "diskpages._native",
        '#include <stdint.h>\n#include <stddef.h>\n#include "diskpages.h"\n',
        sources=_sources(relative),
        include_dirs=[str(HERE) if not relative else os.path.relpath(HERE, ROOT)],
        depends=[str(HEADER), str(HERE / "internal.h")],
        extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
        libraries=["pthread"],
    )
    return ffi


ffibuilder = make_builder(relative=True)

if __name__ == "__main__":
    tmp = ROOT / "build" / "cffi"
    so = Path(make_builder(relative=False).compile(tmpdir=str(tmp), verbose=True))
    target = ROOT / "src" / "diskpages" / so.name
    target.write_bytes(so.read_bytes())
    print("copied", so.name, "->", target.parent)

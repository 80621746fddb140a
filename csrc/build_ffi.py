"""The cffi build script (API mode): compiles csrc/*.c into ``diskpages._native``.

setup.py names it in ``cffi_modules``; ``python csrc/build_ffi.py`` compiles it in place
(into src/diskpages/) for quick work on the C code. The C API is csrc/diskpages.h, read
verbatim as the cdef, so the binding cannot drift from the C.

``DISKPAGES_SANITIZE=address`` (opt-in; unset means the normal -O2 build) compiles the C
with ``-fsanitize=address -fno-omit-frame-pointer -g -O1`` and links it with
``-fsanitize=address``: the extension then needs libasan loaded first, so run Python with
``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``. .ci/run uses it to run the tests marked
``lifetime`` under AddressSanitizer; README.md, "Checking the C", has the command.
"""

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HEADER = HERE / "diskpages.h"

COMPILE_ARGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]
# Per DISKPAGES_SANITIZE value: extra compile args (after COMPILE_ARGS, so -O1 wins over
# -O2) and link args. Only "address" so far; any other value is an error, not ignored.
SANITIZE = {
    "address": (["-fsanitize=address", "-fno-omit-frame-pointer", "-g", "-O1"], ["-fsanitize=address"]),
}


def _sources(relative: bool) -> list[str]:
    # setuptools wants paths relative to setup.py; ffibuilder.compile() changes directory,
    # so the in-place build below needs them absolute.
    paths = sorted(HERE.glob("*.c"))
    return [os.path.relpath(p, ROOT) if relative else str(p) for p in paths]


def _sanitize_args() -> tuple[list[str], list[str]]:
    name = os.environ.get("DISKPAGES_SANITIZE", "")
    if not name:
        return [], []
    if name not in SANITIZE:
        raise SystemExit(f"DISKPAGES_SANITIZE={name!r}: expected one of {sorted(SANITIZE)} or unset")
    return SANITIZE[name]


def make_builder(relative: bool = True) -> FFI:
    compile_extra, link_extra = _sanitize_args()
    ffi = FFI()
    ffi.cdef(HEADER.read_text())
    ffi.set_source(
        "diskpages._native",
        '#include <stdint.h>\n#include <stddef.h>\n#include "diskpages.h"\n',
        sources=_sources(relative),
        include_dirs=[str(HERE) if not relative else os.path.relpath(HERE, ROOT)],
        depends=[str(HEADER), str(HERE / "internal.h")],
        extra_compile_args=COMPILE_ARGS + compile_extra,
        extra_link_args=link_extra,
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

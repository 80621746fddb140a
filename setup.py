# Metadata lives in pyproject.toml; this file only names the cffi extension.
# cffi is imported first on purpose: without it setuptools would ignore cffi_modules with a
# warning and build a package with no extension. With it missing, this line fails loudly.
import cffi  # noqa: F401
from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel


class bdist_wheel_abi3(bdist_wheel):
    """Tag the wheel for the stable ABI (cp311-abi3: one wheel for every CPython from 3.11,
    pyproject's requires-python) when the extension is built for it, as _native.abi3.so.
    cffi decides that (Py_LIMITED_API, and py_limited_api on the Extension it adds): it
    does unless this Python cannot (a debug or free-threaded build), and then the wheel
    keeps its version-specific tag, as its extension's name does."""

    def finalize_options(self) -> None:
        extensions = self.distribution.ext_modules or []
        limited = bool(extensions) and all(getattr(e, "py_limited_api", False) for e in extensions)
        if limited and not self.py_limited_api:  # (unless asked for on the command line)
            self.py_limited_api = "cp311"
        super().finalize_options()


setup(
    cffi_modules=["csrc/build_ffi.py:ffibuilder"],
    cmdclass={"bdist_wheel": bdist_wheel_abi3},
)

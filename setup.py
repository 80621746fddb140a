# Metadata lives in pyproject.toml; this file only names the cffi extension.
# cffi is imported first on purpose: without it setuptools would ignore cffi_modules with a
# warning and build a package with no extension. With it missing, this line fails loudly.
import cffi  # noqa: F401
from setuptools import setup

setup(cffi_modules=["csrc/build_ffi.py:ffibuilder"])

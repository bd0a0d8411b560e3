"""``kvbm._cc.build(..., capi=True)``: a source that includes ``Python.h`` is compiled
against this interpreter's headers and loaded with ``ctypes.PyDLL``."""

from __future__ import annotations

import ctypes
import os

import pytest

from kvbm import _cc

pytestmark = pytest.mark.skipif(_cc.compiler() is None, reason="no C compiler")

SOURCE = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
PyObject *kvbm_test_pair(long a) { return Py_BuildValue("(ls)", a, "kvbm"); }
"""


def test_a_source_that_calls_the_c_api_builds_and_returns_python_objects() -> None:
    lib = _cc.build(SOURCE, "a C API test", "nothing", capi=True)
    assert lib is not None and isinstance(lib, ctypes.PyDLL)
    f = lib.kvbm_test_pair
    f.argtypes = [ctypes.c_long]
    f.restype = ctypes.py_object
    assert f(41) == (41, "kvbm")


def test_without_capi_that_source_finds_no_python_h() -> None:
    """Negative control: the interpreter's headers come from ``capi``, not the compiler's
    own search path."""
    if os.environ.get("CPATH") or os.environ.get("C_INCLUDE_PATH"):
        pytest.skip("the environment adds include directories")
    assert _cc.build(SOURCE, "a C API test", "nothing") is None

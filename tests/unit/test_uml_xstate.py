"""The UML XSAVE shim builds, is cached by source, and exports ptrace. No addresses used.

That it makes UML 6.1 run programs on an AMX host is proven by tests/uml
(every UML test boots through it).
"""

import ctypes

from kubelab.netlab import uml_xstate


def test_shim_builds_once_and_exports_ptrace(tmp_path):
    first = uml_xstate.shim_path(tmp_path)
    assert first.is_file() and first.parent == tmp_path
    assert uml_xstate.shim_path(tmp_path) == first  # cached: same file, no rebuild
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no build leftovers
    lib = ctypes.CDLL(str(first))
    assert lib.ptrace  # the interposed symbol


def test_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(uml_xstate.shutil, "which", lambda name: None)
    try:
        uml_xstate.shim_path(tmp_path)
    except uml_xstate.ShimError as e:
        assert "apt-get install gcc" in str(e)
    else:
        raise AssertionError("expected ShimError")

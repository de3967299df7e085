from __future__ import annotations

import subprocess
import sys
import types

import kvfuse
import kvfuse.ops


def test_all_is_sorted_complete_and_real() -> None:
    for mod in (kvfuse, kvfuse.ops):
        assert mod.__all__ == sorted(mod.__all__), mod.__name__
        assert len(set(mod.__all__)) == len(mod.__all__)
        for name in mod.__all__:
            assert hasattr(mod, name), f"{mod.__name__}.{name}"
        public = {
            n
            for n, v in vars(mod).items()
            if not n.startswith("_") and not isinstance(v, types.ModuleType) and n != "annotations"
        }
        assert public <= set(mod.__all__), (
            f"{mod.__name__} exports names missing from __all__: {public - set(mod.__all__)}"
        )


def test_ops_are_reexported_unchanged() -> None:
    for name in kvfuse.ops.__all__:
        if name in kvfuse.__all__:
            assert getattr(kvfuse, name) is getattr(kvfuse.ops, name)


def test_error_tree_is_drawn_in_its_docstring() -> None:
    from kvfuse import _errors

    for name in _errors.__all__:
        assert name in (_errors.__doc__ or ""), name
        assert issubclass(getattr(_errors, name), kvfuse.KvfuseError)


def test_version_flag() -> None:
    out = subprocess.run([sys.executable, "-m", "kvfuse", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"kvfuse {kvfuse.__version__}"


def test_usage_error_exits_4() -> None:
    res = subprocess.run([sys.executable, "-m", "kvfuse", "devices", "--nope"], capture_output=True, text=True)
    assert res.returncode == 4 and "--nope" in res.stderr

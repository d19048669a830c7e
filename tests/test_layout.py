"""Layout files round-trip exactly and refuse anything that is not an intact layout."""

import dataclasses
import json

import numpy as np
import pytest

from compiler import layout
from compiler.algorithms.meshgemv import lower_gemv
from compiler.layout import LayoutError, load_layout, save_layout
from compiler.program import MeshProgram
from compiler.targets import WSE2
from wafersim.simulate import simulate


@pytest.fixture
def saved(tmp_path):
    prog = lower_gemv(2, 100, 60, 6, 5)
    path = tmp_path / "gemv.wsl"
    save_layout(prog, path, model="test", target=WSE2.to_dict())
    return prog, path


def test_round_trip_is_exact(saved):
    prog, path = saved
    back, info = load_layout(path)
    assert info["model"] == "test" and info["target"]["name"] == "wse2"
    for f in dataclasses.fields(MeshProgram):
        a, b = getattr(prog, f.name), getattr(back, f.name)
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == b.dtype
        else:
            assert a == b
    assert simulate(back, WSE2).makespan_cycles == simulate(prog, WSE2).makespan_cycles


def test_truncated_file_is_refused(saved):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LayoutError, match="unreadable or truncated"):
        load_layout(path)


def rewrite(path, out, edit):
    """Copy a layout's arrays to `out` after `edit(arrays)`, bypassing save_layout."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    edit(arrays)
    with open(out, "wb") as f:
        np.savez(f, **arrays)
    return out


def test_edited_array_is_refused(saved, tmp_path):
    def edit(arrays):
        arrays["msg_bytes"] = arrays["msg_bytes"] + 1

    with pytest.raises(LayoutError, match="checksum mismatch"):
        load_layout(rewrite(saved[1], tmp_path / "edited.wsl", edit))


def test_other_version_is_refused(saved, tmp_path):
    def edit(arrays):
        header = json.loads(arrays["header"].tobytes())
        header["version"] = 999
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)

    with pytest.raises(LayoutError, match="format version 999"):
        load_layout(rewrite(saved[1], tmp_path / "v999.wsl", edit))


def test_foreign_files_are_refused(tmp_path):
    npz = tmp_path / "foreign.npz"
    np.savez(npz, x=np.arange(3))
    with pytest.raises(LayoutError, match="not a wafersim layout"):
        load_layout(npz)
    text = tmp_path / "text.wsl"
    text.write_text("hello")
    with pytest.raises(LayoutError, match="unreadable"):
        load_layout(text)
    with pytest.raises(LayoutError, match="no such file"):
        load_layout(tmp_path / "missing.wsl")


def test_crash_mid_write_leaves_no_loadable_file(tmp_path, monkeypatch):
    prog = lower_gemv(1, 16, 16, 2, 2)
    path = tmp_path / "crash.wsl"

    def half_written(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(layout.np, "savez", half_written)
    with pytest.raises(KeyboardInterrupt):
        save_layout(prog, path)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []

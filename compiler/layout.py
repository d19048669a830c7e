"""Layout files: a MeshProgram (and what it was made for) saved for users to keep.

Format: a numpy `.npz` archive holding the program's arrays (or a stamped program's parts) plus
one `header` entry, a JSON document with the format name and version, the program's scalar
fields, free metadata (the model and target it was compiled for) and a SHA-256 checksum over
every array and every other header field. Loading refuses
a foreign, truncated, edited or incompatible file with a one-line `LayoutError`. Writing goes to
a temporary file that is renamed into place, so a crash mid-write never leaves a loadable file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from compiler.program import MeshProgram
from compiler.stamp import Stamped

FORMAT = "wafersim-layout"
# 2: a program or a stamped program's parts (compiler.stamp); 3: the checksum covers the header;
# 4: a stamped program may carry a second, short body (a prefill's sampled steps)
VERSION = 4
_SCALARS = ("width", "height", "dtype", "tensors", "meta")
_PROGRAM_FIELDS = {f.name for f in dataclasses.fields(MeshProgram)}


class LayoutError(ValueError):
    """A layout file that cannot be trusted."""


def _arrays(program: MeshProgram, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + f.name: getattr(program, f.name) for f in dataclasses.fields(program)
            if f.name not in _SCALARS}


def _scalars(program: MeshProgram) -> dict:
    return {k: getattr(program, k) for k in _SCALARS}


def _checksum(arrays: dict[str, np.ndarray], header: dict) -> str:
    """SHA-256 over every array (name, dtype, shape, bytes) and the header's other fields."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in header.items() if k != "checksum"},
                        sort_keys=True).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_layout(code: MeshProgram | Stamped, path: str | Path, **info) -> None:
    """Write a program (or a stamped program's parts, much smaller) to `path` atomically.
    `info` (JSON-able) is stored in the header."""
    path = Path(path)
    if isinstance(code, Stamped):
        arrays = {**_arrays(code.glue, "glue."), **_arrays(code.body, "body."),
                  **{"stamp." + k: v for k, v in code.parts().items()}}
        program = {"glue": _scalars(code.glue), "body": _scalars(code.body),
                   "ports": code.ports}
        if code.sampled:
            arrays.update(_arrays(code.short, "short."))
            program["short"] = _scalars(code.short)
    else:
        arrays, program = _arrays(code), _scalars(code)
    header = {"format": FORMAT, "version": VERSION, "stamped": isinstance(code, Stamped),
              "program": program, "info": info}
    header = json.loads(json.dumps(header))  # as it will read back (tuples become lists)
    header["checksum"] = _checksum(arrays, header)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
                     **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_layout(path: str | Path, timing_only: bool = False) -> tuple[MeshProgram, dict]:
    """Read a layout file; returns (program, info). Raises LayoutError if it is not intact.
    `timing_only`: expand a stamped program with only what the simulator reads
    (Stamped.expand). A prefill with sampled steps has no one program: see load_code."""
    code, info = load_code(path)
    if isinstance(code, Stamped) and code.sampled:
        raise LayoutError(f"layout {path}: a prefill with sampled steps (timing only); "
                          "`wafersim simulate` runs it")
    if isinstance(code, Stamped):
        return code.expand(timing_only), info
    return code, info


def load_code(path: str | Path) -> tuple[MeshProgram | Stamped, dict]:
    """Read a layout file as stored: a program or a stamped program's parts."""
    path = Path(path)
    if not path.exists():
        raise LayoutError(f"layout {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "header" not in z.files:
                raise LayoutError(f"layout {path}: not a wafersim layout (no header)")
            header = json.loads(z["header"].tobytes().decode())
            arrays = {k: z[k] for k in z.files if k != "header"}
    except LayoutError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, UnicodeDecodeError) as e:
        raise LayoutError(f"layout {path}: unreadable or truncated ({type(e).__name__})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise LayoutError(f"layout {path}: not a wafersim layout file")
    if header.get("version") != VERSION:
        raise LayoutError(f"layout {path}: format version {header.get('version')}, this wafersim "
                          f"reads version {VERSION}; recompile the model")
    if _checksum(arrays, header) != header.get("checksum"):
        raise LayoutError(f"layout {path}: checksum mismatch, the file was edited or damaged")
    try:
        scalars = header["program"]
        if not header.get("stamped"):
            return _program(arrays, scalars), header.get("info", {})
        parts = {k[6:]: v for k, v in arrays.items() if k.startswith("stamp.")}
        short = (_program(arrays, scalars["short"], "short.") if "short" in scalars
                 else None)
        code = Stamped(_program(arrays, scalars["glue"], "glue."),
                       _program(arrays, scalars["body"], "body."), int(scalars["ports"]),
                       **parts, short=short)
    except (KeyError, TypeError) as e:
        raise LayoutError(f"layout {path}: arrays do not match the program format "
                          f"({type(e).__name__} {e})") from None
    return code, header.get("info", {})


def _program(arrays: dict, scalars: dict, prefix: str = "") -> MeshProgram:
    mine = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)
            and k[len(prefix):] in _PROGRAM_FIELDS}
    if set(mine) | set(scalars) != _PROGRAM_FIELDS:
        raise KeyError("fields")
    scalars = dict(scalars)
    scalars["tensors"] = tuple(tuple(t) for t in scalars["tensors"])
    return MeshProgram(**mine, **scalars)

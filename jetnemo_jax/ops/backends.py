"""Tables of backends: which implementation of an op runs is data, the same for every op.

Each op (`delta_rule`, `conv`) lists its backends as `Backend` rows, fastest first. `impl` names one row, or
"auto": the first row whose kernels compile for this platform and support the call (the last rows are pure
XLA and support everything). An explicit `impl` is honoured or fails loudly, never replaced by another row;
kernel rows also run on CPU, interpreted (tests). The choice is logged once per (op, row, platform).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from jetnemo_jax.ops import mesh as kernel_mesh

log = logging.getLogger(__name__)

# The names every op's `impl` takes (an op has a row for some of them): the readable definition, the fastest
# pure-XLA path, one per Pallas backend (`pallas_kernels/<op>/<name>.py`), and fla-core's kernels ("fla").
IMPLS = ("auto", "reference", "xla", "tpu", "triton", "mosaic_gpu", "fla")
_logged: set = set()


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    platform: where its kernels compile ("tpu" or "gpu"; on CPU they run interpreted), None for XLA (anywhere).
    supports(call, interpret): None when it can run the op's `call` (shapes, dtypes, options), else why not.
    fn: the implementation, with the op's own signature for its rows.
    auto_needs_layout: "auto" takes the row on several devices only with a mesh to run it per shard of
    (`mesh.layout_known`): XLA cannot partition a Pallas call inside a sharded jit.
    auto: whether "auto" may take the row at all (False: it runs only when named).
    """
    name: str
    platform: str | None
    supports: Callable[[Any, bool], str | None]
    fn: Callable
    what: str  # its kernels or algorithm, for messages and the log line
    auto_needs_layout: bool = True
    auto: bool = True


def anywhere(call, interpret) -> None:
    """`supports` of a row that runs every call."""
    return None


def why_not(check, *args) -> str | None:
    """None when `check(*args)` passes, else the message of the ValueError it raised (a kernel module's
    `check_supported`, as a row's `supports`)."""
    try:
        check(*args)
    except ValueError as e:
        return str(e)
    return None


def select(op: str, table, impl: str, call, mesh) -> tuple[Backend, bool]:
    """The row of `table` that runs `op` for `impl` ("auto" or a name in IMPLS) on the resolved `mesh`, and
    whether its kernels run interpreted (on CPU). Raises ValueError for an unknown name, a name the op has no
    row for, a row for another platform, or a call the row does not support."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
    where = kernel_mesh.platform(mesh)
    if impl == "auto":
        row = next(r for r in table if r.auto and (r.platform is None or (
            r.platform == where and (kernel_mesh.layout_known(mesh) or not r.auto_needs_layout)
            and r.supports(call, False) is None)))
    else:
        row = next((r for r in table if r.name == impl), None)
        if row is None:
            raise ValueError(f"impl={impl!r}: {op} has no such backend; it has {tuple(r.name for r in table)}")
        if row.platform is not None and where not in (row.platform, "cpu"):
            raise ValueError(f"impl={impl!r} runs the {row.what}, on {row.platform.upper()}s only (not on {where}); "
                             f"impl='auto' picks what this platform has")
    interpret = row.platform is not None and where == "cpu"
    why = row.supports(call, interpret)
    if why is not None:
        raise ValueError(f"impl={row.name!r}: {why}")
    if (op, row.name, where) not in _logged:
        _logged.add((op, row.name, where))
        log.info("%s: impl=%r (%s%s) on %s", op, row.name, row.what, ", interpreted" if interpret else "", where)
    return row, interpret

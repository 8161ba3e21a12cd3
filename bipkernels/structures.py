"""Block structures of a mask: which weights are kept or pruned together.

A weight of shape (out, in, *kernel) is viewed as the matrix (rows, cols) = (out, in·prod(kernel)).

=============  ==========================  ===============================================================
structure      spelled                     blocks (flat block index order)
=============  ==========================  ===============================================================
unstructured   ``"unstructured"``          every element; block index = flat element index
filter         ``"filter"``                one per output channel (row); shape (out,)
channel        ``"channel"``               one per input channel, across all filters and kernel positions;
                                           shape (in,)
N:M            ``"2:4"``                   N kept in every group of M consecutive input channels at the
                                           same (out, kernel position); needs in % M == 0; no threshold
tile           ``"tile4x8"``               4×8 tiles of the (rows, cols) matrix, edge tiles cut short;
                                           shape (ceil(rows/4), ceil(cols/8))
=============  ==========================  ===============================================================

A block's score reduces |s| over its elements: p = 1 sums |s|, p = 2 sums s² (the squared Euclidean
norm, which ranks blocks like the norm while the squares stay in range: in float32 arithmetic, also for
half types, |s| below about 1e-23 squares to 0 and above about 1.8e19 to inf, and such blocks tie).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

KINDS = ("unstructured", "filter", "channel", "nm", "tile")
_NM = re.compile(r"^(\d+):(\d+)$")
_TILE = re.compile(r"^tile:?(\d+)x(\d+)$")


def _fault(kind, a, b, p) -> str | None:
    """What makes (kind, a, b, p) no Structure (see Structure), or None."""
    if kind not in KINDS:
        return f"unknown kind {kind!r}; expected one of {KINDS}"
    if isinstance(p, bool) or not isinstance(p, int) or p not in (1, 2):
        return f"p must be 1 or 2, got {p!r}"
    for name, value in (("a", a), ("b", b)):
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{name} must be an int, got {value!r}"
        if not -2**63 <= value < 2**63:  # the compiled ops take int64
            return f"{name} must fit in 64 bits, got {value!r}"
    if kind == "nm" and not (b >= 1 and 0 <= a <= b):
        return f"N:M needs 0 <= N <= M and M >= 1, got {a}:{b}"
    if kind == "tile" and not (a >= 1 and b >= 1):
        return f"tile sizes must be positive, got {a}x{b}"
    return None


@dataclass(frozen=True)
class Structure:
    """A block structure. ``a``, ``b`` are N, M for "nm" and the tile height, width for "tile"."""

    kind: str = "unstructured"
    a: int = 0
    b: int = 0
    p: int = 1

    def __post_init__(self):
        fault = _fault(self.kind, self.a, self.b, self.p)
        if fault:
            raise ValueError(f"Structure: {fault}")

    @property
    def kind_id(self) -> int:
        """The number the compiled ops take (csrc/include/bipkernels/math.h, StructureKind)."""
        return KINDS.index(self.kind)

    @property
    def uses_threshold(self) -> bool:
        """N:M keeps N per group by itself; every other structure keeps the blocks above a threshold."""
        return self.kind != "nm"

    def op_args(self) -> tuple[int, int, int, int]:
        """(kind, a, b, p) as the registered ops take them."""
        return self.kind_id, self.a, self.b, self.p

    def matrix_shape(self, shape) -> tuple[int, int, int, int]:
        """(rows, cols, channels, inner) of the matrix view of a tensor of this shape."""
        shape = tuple(shape)
        rows = shape[0] if len(shape) >= 1 else 1
        channels = shape[1] if len(shape) >= 2 else 1
        inner = math.prod(shape[2:])
        return rows, channels * inner, channels, inner

    def check_shape(self, shape, name: str = "scores") -> None:
        """Raise ValueError if a tensor of this shape cannot carry this structure."""
        if self.kind == "unstructured":
            return
        if len(shape) == 0:
            raise ValueError(f"structure {self}: {name} must have at least 1 dimension, got a 0-dim tensor")
        if self.kind == "nm":
            channels = self.matrix_shape(shape)[2]
            if channels % self.b:
                raise ValueError(
                    f"structure {self}: {name} has {channels} input channels (shape {tuple(shape)}), "
                    f"not a multiple of M = {self.b}")

    def fitted(self, shape) -> Structure:
        """This structure on a tensor of ``shape``, tile sizes cut to the matrix: the same blocks (a tile
        taller or wider than the matrix is cut at its edge anyway), but no kernel walks, and no reference
        pads, the positions past it (tile1x1000000000 on a (3, 4) weight)."""
        if self.kind != "tile":
            return self
        rows, cols, _, _ = self.matrix_shape(shape)
        return Structure("tile", min(self.a, max(rows, 1)), min(self.b, max(cols, 1)), self.p)

    def block_scores_shape(self, shape) -> tuple[int, ...]:
        """Shape of block_scores() of a tensor of this shape."""
        rows, cols, channels, _ = self.matrix_shape(shape)
        if self.kind == "filter":
            return (rows,)
        if self.kind == "channel":
            return (channels,)
        if self.kind == "tile":
            return (-(-rows // self.a), -(-cols // self.b))
        return tuple(shape)

    def __str__(self) -> str:
        name = {"nm": f"{self.a}:{self.b}", "tile": f"tile{self.a}x{self.b}"}.get(self.kind, self.kind)
        return name if self.p == 1 else f"{name} (p=2)"


def parse_structure(structure: str | Structure = "unstructured", p: int | None = None,
                    owner: str = "parse_structure") -> Structure:
    """A Structure from its spelling ("unstructured", "filter", "channel", "2:4", "tile4x4"; any case,
    surrounding spaces ignored, "tile:4x4" read as "tile4x4") or itself.

    ``p`` (1 or 2), when given, replaces the structure's norm. ``owner``: what the errors name first (the
    public function that took ``structure``; "" for none), e.g. "MaskedLinear: structure: N:M needs ...".
    """
    named = f"{owner}: structure" if owner else "structure"
    if isinstance(structure, Structure):
        fields = (structure.kind, structure.a, structure.b, structure.p)
    elif isinstance(structure, str):
        spelled = structure.strip().lower()
        nm, tile = _NM.match(spelled), _TILE.match(spelled)
        if spelled in ("unstructured", "filter", "channel"):
            fields = (spelled, 0, 0, 1)
        elif nm or tile:
            fields = ("nm" if nm else "tile", int((nm or tile).group(1)), int((nm or tile).group(2)), 1)
        else:
            raise ValueError(
                f"{named}: cannot read {structure!r}; expected 'unstructured', 'filter', 'channel', "
                "'N:M' (e.g. '2:4') or 'tileHxW' (e.g. 'tile4x4')")
    else:
        raise TypeError(f"{named}: expected a str or Structure, got {type(structure).__name__} {structure!r}")
    if p is not None:  # checked even when equal (True == 1)
        fields = (*fields[:3], p)
    fault = _fault(*fields)
    if fault:
        raise ValueError(f"{named}: {fault}")
    return Structure(*fields)

"""What a floating-point format can hold, and how far a correct merge may land from the exact one.

Four formats, each named as NumPy (and PyTorch) names it; a safetensors header names them
``F64``, ``F32``, ``F16``, ``BF16``. A format with ``p`` significant bits rounds a real number
``x`` in its normal range to ``fl(x) = x (1 + d)``, ``|d| <= u = 2^-p`` (the unit round-off), and
near zero adds at most ``tiny``, half its smallest subnormal, in absolute value.

The merge bound (docs/conformance.md derives it term by term): another implementation computed
``W' = W + s B A`` as

    M = fl_d( fl_d(W) + fl_d( fl_acc( s * fl_d(B) fl_d(A) ) ) )

in the merged file's dtype ``d``, accumulating the product in ``acc`` (float32 or better; float64
for a float64 file). Each rounding is optional (an implementation that rounds less is closer),
so with ``E = W + s B A`` and ``S = s |B| |A|`` (elementwise, exact) the error obeys

    |M - E| <= k [ u |E|                  the final rounding of the sum
                   + u |W| [W wider]      W rounded to d first (a float32 base loaded as bfloat16)
                   + u S                  the delta rounded to d before the addition
                   + (2u + u^2) S [A, B wider]   A and B rounded to d before the product
                   + gamma_{r+2}(u_acc) S ]      r products, their sum, the scaling and s itself
               + 4 tiny_d + e_ref

with ``gamma_n(v) = n v / (1 - n v)``, ``k = (1 + u)^3 (1 + u_acc)^(r+2)`` for the second-order
terms, and ``e_ref`` the float64 reference's own error. [`merge_bound`][] is that sum.
"""

from __future__ import annotations

import numpy as np

from minilora.errors import ConfigError

DTYPES = ("float64", "float32", "float16", "bfloat16")
FILE_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
BITS = {"float64": 53, "float32": 24, "float16": 11, "bfloat16": 8}  # significant bits p
UNIT_ROUNDOFF = {d: 2.0 ** -p for d, p in BITS.items()}  # u = 2^-p
_SUBNORMAL_EXP = {"float64": -1074, "float32": -149, "float16": -24, "bfloat16": -133}
TINY = {d: 2.0 ** (e - 1) for d, e in _SUBNORMAL_EXP.items()}  # half the smallest subnormal
_MAX = {"float64": float(np.finfo(np.float64).max), "float32": float(np.finfo(np.float32).max),
        "float16": 65504.0, "bfloat16": (2 - 2.0 ** -7) * 2.0 ** 127}
_EPS64 = 2.0 ** -53


def dtype_name(file_dtype: str) -> str:
    """``"BF16"`` -> ``"bfloat16"``; a dtype name passes through."""
    name = FILE_DTYPES.get(file_dtype, file_dtype)
    if name not in BITS:
        raise ConfigError(f"not a floating-point dtype minilora knows: {file_dtype!r} (expected "
                          f"one of {', '.join(DTYPES)})")
    return name


def wider(a: str, b: str) -> bool:
    """Whether dtype ``a`` holds more significant bits than ``b`` (so ``a`` rounds on the way)."""
    return BITS[dtype_name(a)] > BITS[dtype_name(b)]


def gamma(n: int, u: float) -> float:
    """gamma_n = n u / (1 - n u): the relative error of n roundings of unit round-off u."""
    if n * u >= 1:
        raise ConfigError(f"gamma: {n} roundings of {u:g} bound nothing (n u >= 1)")
    return n * u / (1 - n * u)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """x (float64) rounded to nearest, ties to even, in ``dtype``, returned as float64: the value
    a correct conversion stores. One rounding from float64, subnormals and overflow included
    (for bfloat16 too, which NumPy cannot hold: going through float32 would round twice)."""
    dtype = dtype_name(dtype)
    x = np.asarray(x, dtype=np.float64)
    _, e = np.frexp(x)  # x = m 2^e, 1/2 <= |m| < 1
    step = np.maximum(e - BITS[dtype], _SUBNORMAL_EXP[dtype])  # the spacing near x is 2^step
    q = np.ldexp(np.rint(np.ldexp(x, -step)), step)  # rint: to nearest, ties to even
    return np.where(np.abs(q) > _MAX[dtype], np.copysign(np.inf, x), q)


def reference_error(magnitude: np.ndarray, terms: int) -> np.ndarray:
    """How far the float64 reference itself may be from exact: ``terms`` roundings on values of
    size ``magnitude`` (it is computed with products and sums in float64, in whatever order)."""
    return gamma(terms, _EPS64) * magnitude


def is_correctly_rounded(stored: np.ndarray, exact: np.ndarray, dtype: str,
                         slack: np.ndarray | float = 0.0) -> bool:
    """Whether every element of ``stored`` is what ``dtype`` would hold for some value within
    ``slack`` of ``exact``: rounding is monotone, so that is ``fl(E - slack) <= M <= fl(E +
    slack)``. With the reference's own error as ``slack``, "exact" does not hang on its last bit."""
    low, high = round_to(exact - slack, dtype), round_to(exact + slack, dtype)
    return bool(np.all((low <= stored) & (stored <= high)))


def merge_bound(expected: np.ndarray, base_abs: np.ndarray, delta_abs: np.ndarray | float, *,
                dtype: str, r: int, base_wider: bool, adapter_wider: bool) -> np.ndarray:
    """The elementwise bound on |M - E| for a correct merge stored in ``dtype`` (module docstring).

    expected: E = W + s B A (float64). base_abs: |W|. delta_abs: S = s |B| |A| (0 for a tensor
    that no adapter changes). base_wider / adapter_wider: the base's tensor / the adapter's A and B
    had more bits than ``dtype``, so an implementation may have rounded them to it first.
    """
    dtype = dtype_name(dtype)
    u = UNIT_ROUNDOFF[dtype]
    acc = UNIT_ROUNDOFF["float64" if dtype == "float64" else "float32"]
    k = (1 + u) ** 3 * (1 + acc) ** (r + 2)
    terms = (u * np.abs(expected) + (u * base_abs if base_wider else 0.0)
             + (u + ((2 * u + u * u) if adapter_wider else 0.0) + gamma(r + 2, acc)) * delta_abs)
    return k * terms + 4 * TINY[dtype] + reference_error(base_abs + delta_abs, r + 3)

"""Elementwise ops: arithmetic, exp/log/tanh/sqrt, relu, where, clip.

Each op returns gradients in the *output's* shape; the engine reduces them over broadcast axes.
A backward never writes into ``g``: several inputs may receive the same array.
"""

from __future__ import annotations

import numpy as np

from minilora.errors import ShapeError
from minilora.tensor import Tensor, as_tensor


def _operands(a, b) -> tuple[Tensor, Tensor]:
    """Both operands as Tensors; a Python scalar takes the other side's dtype (float32 stays
    float32)."""
    if isinstance(a, Tensor):
        b = as_tensor(b, like=a)
    elif isinstance(b, Tensor):
        a = as_tensor(a, like=b)
    else:  # two plain numbers or arrays: NumPy's own types
        a, b = as_tensor(a), as_tensor(b)
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ShapeError(f"operands of shapes {a.shape} and {b.shape} do not broadcast") from None
    return a, b


def add(a, b) -> Tensor:
    """a + b, with NumPy broadcasting."""
    a, b = _operands(a, b)

    def backward(g):
        return g, g

    return Tensor.from_op(a.data + b.data, (a, b), backward)


def sub(a, b) -> Tensor:
    """a - b, with NumPy broadcasting."""
    a, b = _operands(a, b)

    need_b = b.requires_grad

    def backward(g):
        return g, (-g if need_b else None)

    return Tensor.from_op(a.data - b.data, (a, b), backward)


def mul(a, b) -> Tensor:
    """a * b, with NumPy broadcasting."""
    a, b = _operands(a, b)

    ad, bd, need_a, need_b = a.data, b.data, a.requires_grad, b.requires_grad

    def backward(g):
        return (g * bd if need_a else None, g * ad if need_b else None)

    return Tensor.from_op(ad * bd, (a, b), backward)


def div(a, b) -> Tensor:
    """a / b, with NumPy broadcasting."""
    a, b = _operands(a, b)
    bd, need_a, need_b = b.data, a.requires_grad, b.requires_grad
    out = a.data / bd

    def backward(g):
        ga = g / bd if need_a else None
        gb = -g * out / bd if need_b else None
        return ga, gb

    return Tensor.from_op(out, (a, b), backward)


def neg(a: Tensor) -> Tensor:
    """-a."""
    return Tensor.from_op(-a.data, (a,), lambda g: (-g,))


def _power(x: np.ndarray, p: float) -> np.ndarray:
    # np.power with a float32 base and a small integer exponent is far slower than x*x*x
    if p == 1:
        return x.copy()
    if p == 2:
        return x * x
    if p == 3:
        return x * x * x
    if p == 0.5:
        return np.sqrt(x)
    return np.power(x, np.asarray(p, dtype=x.dtype))


def pow(a, exponent) -> Tensor:
    """a ** exponent; the exponent may be a number or a Tensor (then a must be positive)."""
    if not isinstance(exponent, Tensor) and np.ndim(exponent) == 0:
        a = as_tensor(a)
        p, ad = float(exponent), a.data
        out = _power(ad, p)

        def backward_scalar(g):
            if p == 0:  # a constant: zero gradient, also at a = 0 where 0 * a**-1 would be nan
                return (np.zeros_like(g),)
            return (g * (p * _power(ad, p - 1)).astype(ad.dtype, copy=False),)

        return Tensor.from_op(out, (a,), backward_scalar)

    a, b = _operands(a, exponent)
    ad, bd, need_a, need_b = a.data, b.data, a.requires_grad, b.requires_grad
    out = np.power(ad, bd)

    def backward(g):
        ga = g * bd * np.power(ad, bd - 1) if need_a else None
        gb = g * out * np.log(ad) if need_b else None
        return ga, gb

    return Tensor.from_op(out, (a, b), backward)


def exp(a: Tensor) -> Tensor:
    """e ** a."""
    out = np.exp(a.data)
    return Tensor.from_op(out, (a,), lambda g: (g * out,))


def log(a: Tensor) -> Tensor:
    """Natural logarithm."""
    ad = a.data
    return Tensor.from_op(np.log(ad), (a,), lambda g: (g / ad,))


def tanh(a: Tensor) -> Tensor:
    """Hyperbolic tangent; d tanh = 1 - tanh**2."""
    out = np.tanh(a.data)
    return Tensor.from_op(out, (a,), lambda g: (g * (1 - out * out),))


def sqrt(a: Tensor) -> Tensor:
    """Square root; d sqrt(a) = 1 / (2 sqrt(a))."""
    out = np.sqrt(a.data)
    return Tensor.from_op(out, (a,), lambda g: (g / (2 * out),))


def relu(a: Tensor) -> Tensor:
    """max(a, 0); the gradient at 0 is taken as 0."""
    positive = a.data > 0
    out = np.where(positive, a.data, np.zeros((), a.dtype))  # +0.0 for negatives, not -0.0
    return Tensor.from_op(out, (a,), lambda g: (g * positive,))


def where(condition, a, b) -> Tensor:
    """Elementwise ``a`` where ``condition`` else ``b`` (condition: boolean array, no gradient)."""
    cond = np.asarray(condition.data if isinstance(condition, Tensor) else condition, dtype=bool)
    a, b = _operands(a, b)
    try:
        out = np.where(cond, a.data, b.data)
    except ValueError:
        raise ShapeError(
            f"where(): condition {cond.shape}, a {a.shape} and b {b.shape} do not broadcast"
        ) from None

    need_a, need_b = a.requires_grad, b.requires_grad

    def backward(g):
        ga = np.where(cond, g, 0) if need_a else None
        gb = np.where(cond, 0, g) if need_b else None
        return ga, gb

    return Tensor.from_op(out, (a, b), backward)


def masked_fill(a: Tensor, mask, value: float) -> Tensor:
    """``a`` with ``value`` wherever the boolean ``mask`` (broadcast to ``a``) is True."""
    mask = np.asarray(mask.data if isinstance(mask, Tensor) else mask, dtype=bool)
    try:
        out = np.where(mask, np.asarray(value, dtype=a.dtype), a.data)
    except ValueError:
        raise ShapeError(f"masked_fill(): mask {mask.shape} does not broadcast to {a.shape}") \
            from None
    if out.shape != a.shape:
        raise ShapeError(f"masked_fill(): mask {mask.shape} would grow tensor {a.shape} to "
                         f"{out.shape}")
    return Tensor.from_op(out, (a,), lambda g: (np.where(mask, 0, g),))


def clip(a: Tensor, a_min: float | None, a_max: float | None) -> Tensor:
    """``a`` limited to [a_min, a_max]; the gradient is zero where the limit is active."""
    lo = -np.inf if a_min is None else a_min
    hi = np.inf if a_max is None else a_max
    inside = (a.data >= lo) & (a.data <= hi)
    out = np.clip(a.data, lo, hi).astype(a.dtype, copy=False)
    return Tensor.from_op(out, (a,), lambda g: (g * inside,))


def astype(a: Tensor, dtype) -> Tensor:
    """``a`` converted to ``dtype``; the gradient is converted back."""
    dtype = np.dtype(dtype)
    if dtype == a.dtype:
        return a
    src = a.dtype
    return Tensor.from_op(a.data.astype(dtype), (a,), lambda g: (g.astype(src),))

"""One gradient check for every op, one composition check for every fused op, and their inputs.

``gradcheck`` compares the engine's vector-Jacobian product with central finite differences, in
float64, for a *random* upstream gradient ``G``: it checks ``d<f(x), G>/dx`` for each input, which
pins down the whole VJP, where ``f(x).sum()`` would only check ``G = 1``.

``assert_same_function`` runs a fused kernel and its composition of primitives on the same float64
inputs and the same random ``G``, and compares the values and every input's gradient.

The Hypothesis strategies below draw shapes with ``hypothesis.extra.numpy`` (size-1 axes and
broadcasting pairs included) and keep arrays small, so finite differences stay cheap.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import hypothesis.extra.numpy as hnp
import numpy as np
from hypothesis import settings
from hypothesis import strategies as st

from minilora import Tensor, no_grad

# ---- tolerances, each written once ----------------------------------------------------------

# Finite differences in float64 with step H = 1e-6: the truncation error is ~H^2 |f'''| ~ 1e-12 and
# the round-off ~eps64 |L| / H ~ 1e-16 * 100 / 1e-6 = 1e-8 for the sizes drawn here (|L| < ~100).
# rtol 1e-5 / atol 1e-6 sits far above both, and far below any real VJP mistake (a dropped term or
# a flipped sign is an O(1) error).
H = 1e-6
GRAD_TOL = dict(rtol=1e-5, atol=1e-6)

# A fused kernel and its composition are the same formula evaluated in a different order, both in
# float64: they differ by round-off, ~1e-16 per op over a few dozen ops, amplified a little by
# normalisation (layer_norm's 1/std, softmax). 1e-9 leaves room for that and nothing else.
FUSED_TOL = dict(rtol=1e-9, atol=1e-10)

# float32 results compared with the same computation in float64: float32 has 24 bits (eps ~1.2e-7);
# a few dozen roundings on values of order 1 stay below 1e-5.
F32_TOL = dict(rtol=1e-5, atol=1e-5)

# Property tests: enough examples to hit size-1 axes and broadcasting, few enough that the whole
# engine suite runs in well under a minute. No deadline: the first call pays for imports.
FAST = settings(max_examples=30, deadline=None)


# ---- the checks -----------------------------------------------------------------------------

Op = Callable[..., "Tensor | Sequence[Tensor]"]


def _outputs(result) -> list[Tensor]:
    return list(result) if isinstance(result, (list, tuple)) else [result]


def gradcheck(f: Op, *inputs, frozen: Sequence[int] = (), seed: int = 0, tol=GRAD_TOL) -> list:
    """Check every input's gradient of ``f(*tensors)`` against central finite differences.

    inputs: arrays, made float64 Tensors that require grad, except those whose position is in
    ``frozen`` (they must end with ``.grad is None``). ``f`` may return one Tensor or several (then
    each gets its own random upstream gradient). Anything that is not differentiated (integer
    targets, masks, generators) belongs in ``f``'s closure. Returns the analytic gradients.
    """
    arrays = [np.array(a, dtype=np.float64) for a in inputs]
    tensors = [Tensor(a.copy(), requires_grad=i not in frozen) for i, a in enumerate(arrays)]
    outs = _outputs(f(*tensors))
    rng = np.random.default_rng(seed)
    upstream = [rng.standard_normal(o.shape) for o in outs]
    for n, (out, g) in enumerate(zip(outs, upstream, strict=True)):
        assert out.dtype == np.float64, f"output {n} is {out.dtype}, not float64"
        if out.requires_grad:
            out.backward(g, retain_graph=n < len(outs) - 1)

    def loss(arrs) -> float:  # <f(x), G>: the scalar whose gradient the VJP must give
        with no_grad():
            values = _outputs(f(*[Tensor(a) for a in arrs]))
        return sum(float(np.sum(v.data * g)) for v, g in zip(values, upstream, strict=True))

    grads = []
    for i, t in enumerate(tensors):
        if i in frozen:
            assert t.grad is None, f"input {i} does not require grad but received one"
            grads.append(None)
            continue
        x = arrays[i]
        numeric = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            original = x[idx]
            x[idx] = original + H
            up = loss(arrays)
            x[idx] = original - H
            down = loss(arrays)
            x[idx] = original
            numeric[idx] = (up - down) / (2 * H)
        analytic = np.zeros_like(x) if t.grad is None else t.grad
        assert analytic.shape == x.shape, f"input {i}: grad shape {analytic.shape} != {x.shape}"
        assert analytic.dtype == np.float64, f"input {i}: grad dtype {analytic.dtype}"
        np.testing.assert_allclose(analytic, numeric, **tol, err_msg=f"gradient of input {i}")
        grads.append(analytic)
    return grads


def assert_same_function(fused: Op, composed: Op, *inputs, frozen: Sequence[int] = (),
                         seed: int = 0, tol=FUSED_TOL) -> None:
    """``fused`` and ``composed`` agree in value and in every input's gradient (float64)."""
    results = []
    for fn in (fused, composed):
        tensors = [Tensor(np.array(a, dtype=np.float64), requires_grad=i not in frozen)
                   for i, a in enumerate(inputs)]
        out = fn(*tensors)
        out.backward(np.random.default_rng(seed).standard_normal(out.shape))
        results.append((out.data, [t.grad for t in tensors]))
    (value, grads), (expected_value, expected_grads) = results
    np.testing.assert_allclose(value, expected_value, **tol, err_msg="value")
    for i, (g, e) in enumerate(zip(grads, expected_grads, strict=True)):
        if i in frozen:
            assert g is None and e is None, f"frozen input {i} received a gradient"
            continue
        np.testing.assert_allclose(g, e, **tol, err_msg=f"gradient of input {i}")


# ---- what to feed them ----------------------------------------------------------------------

def floats(lo: float = -2.0, hi: float = 2.0, avoid: Sequence[float] = (), gap: float = 0.05):
    """float64 elements in [lo, hi], at least ``gap`` away from each point of ``avoid``.

    Kinks (relu at 0, clip at its limits) and poles (1/x at 0) are where finite differences and the
    one-sided derivative an op chooses legitimately disagree, so values keep clear of them.
    """
    edges = [lo, *sorted(p for p in avoid if lo < p < hi), hi]
    pieces = []
    for k, (a, b) in enumerate(itertools.pairwise(edges)):
        a = a if k == 0 else a + gap
        b = b if k == len(edges) - 2 else b - gap
        if a < b:
            pieces.append(st.floats(a, b, allow_nan=False, allow_subnormal=False))
    return st.one_of(pieces)


def values(shape, elements=None):
    """A float64 array of ``shape`` drawn by Hypothesis (edge values such as 0, 1 and repeats)."""
    return hnp.arrays(np.float64, shape, elements=floats() if elements is None else elements)


def randn(shape):
    """A standard-normal float64 array of ``shape`` from a drawn seed.

    For the fused kernels: Hypothesis' favourite arrays (all equal, all zero) give layer_norm a zero
    variance and softmax a flat row, where finite differences lose their accuracy.
    """
    seeds = st.integers(0, 2**32 - 1)
    return seeds.map(lambda seed: np.random.default_rng(seed).standard_normal(shape))


def distinct(shape):
    """float64 values 0.25 apart in random order: no ties, so max has one winner per row even
    after a finite-difference step."""
    size = int(np.prod(shape, dtype=int))
    return st.permutations(range(size)).map(
        lambda p: (np.array(p, dtype=np.float64).reshape(shape) - size / 2) * 0.25
    )


def shapes(min_dims: int = 0, max_dims: int = 3, min_side: int = 1, max_side: int = 3):
    """Small array shapes, size-1 axes included."""
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side,
                            max_side=max_side)


def broadcast_pairs(max_dims: int = 3, max_side: int = 3):
    """Two shapes that broadcast together (as ``hnp.mutually_broadcastable_shapes``)."""
    return hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=max_dims,
                                             min_side=1, max_side=max_side)

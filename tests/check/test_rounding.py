"""The dtype facts and the merge bound of minilora.check.rounding: rounding to each dtype is the
correct one, and every way a correct implementation may round a merge lands within the bound,
while a merge that is off by its own delta does not."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from minilora.check.rounding import (
    UNIT_ROUNDOFF,
    gamma,
    is_correctly_rounded,
    merge_bound,
    round_to,
)

FLOAT32S = arrays(np.float32, st.integers(1, 40),
                  elements=st.floats(-2.0**99, 2.0**99, width=32, allow_subnormal=True))
FLOAT64S = arrays(np.float64, st.integers(1, 40),
                  elements=st.floats(-6e4, 6e4, allow_subnormal=True))


@given(FLOAT64S)
def test_rounding_to_float32_and_float16_is_numpys_correct_conversion(x):
    assert np.array_equal(round_to(x, "float32"), x.astype(np.float32).astype(np.float64))
    assert np.array_equal(round_to(x, "float16"), x.astype(np.float16).astype(np.float64))


def _bfloat16_by_bits(x32: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even to bfloat16 on the float32 bits (the classic integer recipe)."""
    bits = x32.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return (rounded.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


@given(FLOAT32S)
def test_rounding_a_float32_to_bfloat16_matches_the_bit_recipe(x):
    assert np.array_equal(round_to(x.astype(np.float64), "bfloat16"), _bfloat16_by_bits(x))


def test_ties_go_to_even_and_overflow_to_infinity():
    # 1 + 2^-8 is halfway between bfloat16's 1 and 1 + 2^-7: to even, 1; 1 + 3 * 2^-8 up
    x = np.array([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 65520.0, -1e39])
    assert round_to(x[:2], "bfloat16").tolist() == [1.0, 1 + 2.0 ** -6]
    assert np.isinf(round_to(x[2:3], "float16")).all()  # 65520 rounds past float16's 65504
    assert np.isneginf(round_to(x[3:], "bfloat16")).all()


def test_correctly_rounded_allows_the_references_slack_and_no_more():
    exact = np.array([1 + 2.0 ** -25])  # just above the float32 midpoint between 1 and 1+2^-23
    up, down = np.array([1 + 2.0 ** -23]), np.array([1.0])
    assert is_correctly_rounded(down, exact, "float32")
    assert not is_correctly_rounded(up, exact, "float32")
    assert is_correctly_rounded(up, exact, "float32", slack=2.0 ** -24)  # E could be past it


# ---- the merge bound: every way of rounding a correct merge lands inside --------------------

def _implementations(W, A, B, s, dtype):
    """Correct merges in ``dtype`` as real libraries compute them (float32 accumulation), each
    with the roundings it makes before the last: (W rounded first, A and B rounded first)."""
    fl = lambda x: round_to(x, dtype)  # noqa: E731
    f32 = np.float32

    def delta32(B, A):
        return (f32(s) * (B.astype(f32) @ A.astype(f32))).astype(np.float64)

    return {
        "one rounding of the exact sum": (fl(W + s * (B @ A)), False, False),
        "float32 delta, one rounding": (fl(W + delta32(B, A)), False, False),
        "the delta rounded, then the sum": (fl(W + fl(delta32(B, A))), False, False),
        "W rounded first, the delta rounded, then the sum (PEFT in half precision)":
            (fl(fl(W) + fl(delta32(B, A))), True, False),
        "A and B rounded to the dtype first": (fl(fl(W) + fl(delta32(fl(B), fl(A)))), True, True),
    }


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["float32", "float16", "bfloat16"]), st.integers(1, 8),
       st.integers(1, 6), st.integers(1, 6), st.floats(0.1, 8), st.integers(0, 2**32 - 1))
def test_every_correct_merge_is_within_the_bound(dtype, r, n_out, n_in, s, seed):
    """Each term of the bound is needed by one of these (drop it and that one falls outside)."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n_out, n_in)) * 0.05
    A, B = rng.uniform(-0.5, 0.5, (r, n_in)), rng.standard_normal((n_out, r)) * 0.3
    E = W + s * (B @ A)
    for name, (M, base_wider, adapter_wider) in _implementations(W, A, B, s, dtype).items():
        bound = merge_bound(E, np.abs(W), s * (np.abs(B) @ np.abs(A)), dtype=dtype, r=r,
                            base_wider=base_wider, adapter_wider=adapter_wider)
        assert np.all(np.abs(M - E) <= bound), name


def _bfloat16_merge(W, A, B, round_inputs=False):
    """fl(fl(W) + fl(B A)) in bfloat16, s = 1, 1 x 1 matrices (A, B rounded first if asked)."""
    fl = lambda x: round_to(np.array([[x]]), "bfloat16")  # noqa: E731
    a, b = (fl(A), fl(B)) if round_inputs else (np.array([[A]]), np.array([[B]]))
    return fl(fl(W)[0, 0] + fl((b @ a)[0, 0])[0, 0])[0, 0]


def _bound(W, A, B, **flags):
    E = np.array([[W + B * A]])
    return merge_bound(E, np.array([[abs(W)]]), np.array([[abs(B * A)]]), dtype="bfloat16",
                       r=1, **flags)[0, 0]


def test_each_term_of_the_bound_is_needed():
    """Worst cases, one per term, in bfloat16 (u = 2^-8, eps a last-place nudge): each merge is
    within the bound and outside it without its term, so no term is slack."""
    eps = 2.0 ** -20
    # W rounded to the dtype first: W just below a midpoint rounds down, then the sum ties down
    W, A, B = 1 + 2.0 ** -8 - eps, 1.0, 2.0 ** -8 - 2 * eps
    err = abs(_bfloat16_merge(W, A, B) - (W + A * B))
    assert err <= _bound(W, A, B, base_wider=True, adapter_wider=False)
    assert err > _bound(W, A, B, base_wider=False, adapter_wider=False)
    # the delta rounded before the sum: a large delta cancels against W
    W, A, B = -(1 - 2.0 ** -8), 1.0, 1 + 2.0 ** -8 - eps
    err = abs(_bfloat16_merge(W, A, B) - (W + A * B))
    u, acc = UNIT_ROUNDOFF["bfloat16"], UNIT_ROUNDOFF["float32"]
    assert err <= _bound(W, A, B, base_wider=False, adapter_wider=False)
    assert err > (1 + u) ** 3 * (1 + acc) ** 3 * (u * abs(W + A * B) + gamma(3, acc) * abs(A * B))
    # A and B rounded to the dtype before the product: both errors point the same way
    W, A, B = -1.0, 1 + 2.0 ** -8 - eps, 1 + 2.0 ** -8 - eps
    err = abs(_bfloat16_merge(W, A, B, round_inputs=True) - (W + A * B))
    assert err <= _bound(W, A, B, base_wider=False, adapter_wider=True)
    assert err > _bound(W, A, B, base_wider=False, adapter_wider=False)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_a_resolvable_delta_added_twice_is_outside_the_bound(dtype):
    """The bound is not vacuous: once s B A is large against u |W'|, doubling it shows."""
    rng = np.random.default_rng(0)
    W, A, B, s = rng.standard_normal((8, 8)) * 0.02, rng.uniform(-.25, .25, (4, 8)), \
        rng.standard_normal((8, 4)) * 0.1, 1.5
    E = W + s * (B @ A)
    bound = merge_bound(E, np.abs(W), s * (np.abs(B) @ np.abs(A)), dtype=dtype, r=4,
                        base_wider=True, adapter_wider=True)
    assert np.any(np.abs(round_to(W + 2 * s * (B @ A), dtype) - E) > bound)


def test_gamma_is_n_u_over_one_minus_n_u():
    assert gamma(3, UNIT_ROUNDOFF["bfloat16"]) == 3 / 256 / (1 - 3 / 256)
    with pytest.raises(ValueError):
        gamma(256, UNIT_ROUNDOFF["bfloat16"])

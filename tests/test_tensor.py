"""The engine: accumulation, no_grad, freeing the graph as backward walks it, deep chains, gradients
that never alias, retained non-leaf gradients, the Tensor API, and the errors of misuse."""

import operator
import weakref

import numpy as np
import pytest

from minilora import GradError, MiniLoRAError, ShapeError, Tensor, is_grad_enabled, no_grad, ops


def leaf(*shape, seed=0):
    """A float64 tensor that requires grad."""
    return Tensor(np.random.default_rng(seed).standard_normal(shape), requires_grad=True)


# ---- accumulation -----------------------------------------------------------------------------


def test_gradient_accumulates_when_a_tensor_is_used_twice():
    x = leaf(3)
    (x * x + x).backward(np.ones(3))
    np.testing.assert_allclose(x.grad, 2 * x.data + 1)


def test_gradient_accumulates_through_a_shared_intermediate():
    """A diamond: h feeds two branches; h's gradient is the sum of both before it reaches x."""
    x = leaf(3)
    h = ops.exp(x)
    (h * 2.0 + h * 3.0).sum().backward()
    np.testing.assert_allclose(x.grad, 5.0 * np.exp(x.data))


def test_gradients_accumulate_across_two_backward_calls():
    x = leaf(3)
    (x * 2.0).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_allclose(x.grad, np.full(3, 5.0))


def test_retain_graph_allows_a_second_backward_through_the_same_graph():
    x = leaf(3)
    loss = (ops.tanh(x) * 2.0).sum()
    loss.backward(retain_graph=True)
    first = x.grad.copy()
    loss.backward()
    np.testing.assert_allclose(x.grad, 2 * first)


# ---- no_grad ----------------------------------------------------------------------------------


def test_no_grad_builds_no_graph():
    x = leaf(3)
    with no_grad():
        y = ops.exp(x * 2.0 + 1.0)
    assert not y.requires_grad and y.is_leaf and y.grad_fn is None


def test_no_grad_outputs_hold_no_reference_to_their_inputs():
    x = leaf(3)
    with no_grad():
        h = x * 2.0
        y = h * 3.0
    gone = weakref.ref(h)
    del h
    assert gone() is None and not y.requires_grad


def test_no_grad_works_as_a_decorator():
    @no_grad()
    def double(t):
        assert not is_grad_enabled()
        return t * 2.0

    y = double(leaf(3))
    assert not y.requires_grad and is_grad_enabled()


def test_no_grad_restores_grad_mode_after_an_exception():
    with pytest.raises(ZeroDivisionError), no_grad():
        raise ZeroDivisionError
    assert is_grad_enabled()
    assert (leaf(2) * 2.0).requires_grad


def test_no_grad_nested_keeps_grad_off_until_the_outer_block_ends():
    with no_grad():
        with no_grad():
            pass
        assert not is_grad_enabled()
    assert is_grad_enabled()


# ---- memory -----------------------------------------------------------------------------------


def test_the_graph_holds_no_tensor_only_what_backward_saved():
    """An op output no backward needs dies with its Tensor; a saved one lives until backward."""
    x = leaf(3)
    s = x + 1.0  # add's backward needs neither input nor output
    h = ops.exp(s)  # exp's backward keeps its output array
    loss = (h * 3.0).sum()
    s_array, h_tensor, h_array = weakref.ref(s.data), weakref.ref(h), weakref.ref(h.data)
    del s, h
    assert s_array() is None and h_tensor() is None  # the graph links nodes, not tensors
    assert h_array() is not None  # saved by exp for its VJP
    loss.backward()
    assert h_array() is None


def test_activations_are_freed_as_backward_walks_past_them():
    """By the time the VJP of the first op runs, the activation saved by a later op is gone."""
    x = leaf(4)
    seen = {}

    def identity_probe(t):  # an op whose backward looks up whether `top` is still alive
        def backward(g):
            seen["top alive"] = top_alive() is not None
            seen["saved array alive"] = saved_alive() is not None
            return (g,)
        return Tensor.from_op(t.data.copy(), (t,), backward)

    top = ops.exp(identity_probe(x))  # exp saves its output for its VJP
    top_alive, saved_alive = weakref.ref(top), weakref.ref(top.data)
    loss = (top * 2.0).sum()
    del top
    loss.backward()
    assert seen == {"top alive": False, "saved array alive": False}


def test_backward_through_a_100000_op_chain_needs_no_recursion():
    x = leaf(3)
    y = x
    for _ in range(100_000):
        y = -y  # an even number of negations: the gradient is 1
    y.backward(np.ones(3))
    np.testing.assert_array_equal(x.grad, np.ones(3))


def test_a_100000_op_chain_dropped_without_backward_is_freed_safely():
    """Dropping a deep graph must not overflow the stack while Python frees it."""
    x = leaf(3)
    y = x
    for _ in range(100_000):
        y = -y
    gone = weakref.ref(y)
    del y
    assert gone() is None


# ---- gradients own their memory ---------------------------------------------------------------


def test_leaf_gradients_never_share_memory():
    """add hands the same array to both inputs; each .grad must still be its own array."""
    a, b = leaf(2, 3), leaf(2, 3, seed=1)
    (a + b).backward(np.ones((2, 3)))
    assert a.grad is not b.grad and not np.shares_memory(a.grad, b.grad)
    a.grad += 1.0  # an optimizer updating one gradient in place
    np.testing.assert_array_equal(b.grad, np.ones((2, 3)))


def test_backward_copies_the_upstream_gradient_it_is_given():
    a = leaf(3)
    upstream = np.ones(3)
    (a + 0.0).backward(upstream)
    upstream[:] = 7.0
    np.testing.assert_array_equal(a.grad, np.ones(3))


def test_a_broadcast_gradient_is_a_writable_array_of_its_own():
    """sum's VJP is a read-only broadcast view; the engine copies it before storing it."""
    x = leaf(2, 3)
    x.sum().backward()
    x.grad *= 0.5  # fails on a read-only view
    np.testing.assert_array_equal(x.grad, np.full((2, 3), 0.5))


def test_retained_and_leaf_gradients_do_not_alias():
    a, b = leaf(3), leaf(3, seed=1)
    h = (a * 1.0).retain_grad()
    (h + b).backward(np.ones(3))
    assert not np.shares_memory(h.grad, b.grad) and not np.shares_memory(h.grad, a.grad)


def test_retain_grad_keeps_the_gradient_of_a_non_leaf_and_only_that_one():
    x = leaf(3)
    h = (x * 2.0).retain_grad()
    other = x * 3.0
    (h * h + other).sum().backward()
    np.testing.assert_allclose(h.grad, 2 * h.data)
    assert other.grad is None


# ---- the Tensor API ---------------------------------------------------------------------------


def test_shape_dtype_ndim_and_size_are_the_arrays():
    x = Tensor(np.zeros((2, 3), np.float32))
    assert (x.shape, x.dtype, x.ndim, x.size, len(x)) == ((2, 3), np.float32, 2, 6, 2)


def test_pytorch_habits_work_on_tensors_and_parameters():
    """numel(), shape, dtype, item(), detach(): what a PyTorch user reaches for first."""
    from minilora.nn import Parameter

    for x in (Tensor(np.zeros((2, 3), np.float32)), Parameter(np.zeros((2, 3), np.float32))):
        assert x.numel() == 6 and type(x.numel()) is int
        assert x.shape == (2, 3) and x.dtype == np.float32
        d = x.detach()
        assert d.data is x.data and not d.requires_grad and d.is_leaf
    assert Parameter(np.array([1.5])).item() == 1.5


def test_T_reverses_the_axes_and_carries_the_gradient():
    x = leaf(2, 3, 4)
    y = x.T
    assert y.shape == (4, 3, 2)
    y.backward(np.arange(24.0).reshape(4, 3, 2))
    np.testing.assert_array_equal(x.grad, np.arange(24.0).reshape(4, 3, 2).T)


def test_item_gives_a_python_number():
    value = Tensor(np.array([[2.5]], np.float32)).item()
    assert value == 2.5 and type(value) is float


def test_item_of_a_tensor_with_several_elements_names_its_shape():
    with pytest.raises(ShapeError, match=r"\(2,\)"):
        Tensor(np.ones(2)).item()


def test_detach_shares_the_data_but_cuts_the_graph():
    x = leaf(3)
    d = (x * 2.0).detach()
    assert d.is_leaf and not d.requires_grad
    y = d * x
    y.sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.data)  # d counted as a constant


@pytest.mark.parametrize(
    "compare", [operator.lt, operator.le, operator.gt, operator.ge, operator.eq, operator.ne],
    ids=["<", "<=", ">", ">=", "==", "!="],
)
def test_comparisons_give_plain_boolean_arrays(compare):
    x, y = Tensor(np.array([1.0, 2.0, 3.0])), Tensor(np.array([3.0, 2.0, 1.0]))
    result = compare(x, y)
    assert type(result) is np.ndarray and result.dtype == bool
    np.testing.assert_array_equal(result, compare(x.data, y.data))
    np.testing.assert_array_equal(compare(x, 2.0), compare(x.data, 2.0))


INDICES = {
    "int": 1,
    "negative-int": -1,
    "ints": (0, 2),
    "slice": slice(1, None),
    "step-slice": (slice(None), slice(None, None, -2)),
    "int-array": np.array([2, 0, 2]),
    "list": [1, 1],
    "array-pair": (np.array([0, 1]), np.array([2, 2])),
}


@pytest.mark.parametrize("index", INDICES.values(), ids=INDICES.keys())
def test_indexing_gives_numpys_values_and_routes_the_gradient_back(index):
    x = Tensor(np.arange(12.0).reshape(3, 4), requires_grad=True)
    y = x[index]
    np.testing.assert_array_equal(y.data, x.data[index])
    y.backward(np.ones(y.shape))
    expected = np.zeros((3, 4))
    np.add.at(expected, index, 1.0)  # repeated picks add up
    np.testing.assert_array_equal(x.grad, expected)


def test_operators_with_scalars_and_arrays_on_either_side_give_tensors():
    x = leaf(3)
    for result in (2 - x, 2.0 / x, 3 * x, 1 + x, x**2, 2.0**x, np.ones(3) + x, np.ones((2, 3)) @ x):
        assert isinstance(result, Tensor) and result.requires_grad


# ---- bad input --------------------------------------------------------------------------------


def test_backward_on_a_non_scalar_without_a_gradient_says_it_needs_one():
    y = leaf(2, 3) * 2.0
    with pytest.raises(GradError, match=r"scalar.*\(2, 3\)"):
        y.backward()


def test_backward_through_a_freed_graph_says_it_was_freed():
    loss = (leaf(3) * 2.0).sum()
    loss.backward()
    with pytest.raises(GradError, match=r"already been freed.*retain_graph=True"):
        loss.backward()


def test_backward_through_a_freed_intermediate_says_it_was_freed():
    """A new graph built on a node whose own graph was freed cannot reach past it."""
    x = leaf(3)
    h = x * 2.0
    h.sum().backward()
    with pytest.raises(GradError, match="freed"):
        (h * 3.0).sum().backward()


def test_backward_on_a_tensor_that_does_not_require_grad_says_so():
    with pytest.raises(GradError, match="does not require grad"):
        Tensor(np.ones(())).backward()


def test_backward_with_a_gradient_of_the_wrong_shape_names_both_shapes():
    with pytest.raises(ShapeError, match=r"\(3,\).*\(2, 3\)"):
        (leaf(2, 3) * 2.0).backward(np.ones(3))


@pytest.mark.parametrize("make", [lambda: Tensor(np.arange(3), requires_grad=True),
                                  lambda: Tensor(np.arange(3)).requires_grad_()],
                         ids=["constructor", "requires_grad_"])
def test_requires_grad_on_an_integer_tensor_names_the_dtype(make):
    with pytest.raises(GradError, match=r"floating-point.*int64"):
        make()


def test_engine_errors_are_minilora_errors_and_builtin_ones():
    """``except MiniLoRAError`` and ``except RuntimeError`` / ``ValueError`` both catch them."""
    assert issubclass(GradError, MiniLoRAError) and issubclass(GradError, RuntimeError)
    assert issubclass(ShapeError, MiniLoRAError) and issubclass(ShapeError, ValueError)


def test_no_grad_is_per_thread():
    """no_grad in one thread must not stop another thread from recording its graph."""
    import threading

    x = Tensor(np.ones(3), requires_grad=True)
    inside, other = threading.Event(), {}

    def worker():
        inside.wait()
        other["requires_grad"] = (x * 2.0).requires_grad

    t = threading.Thread(target=worker)
    t.start()
    with no_grad():
        inside.set()
        t.join()
        assert not (x * 2.0).requires_grad
    assert other["requires_grad"]


def test_plain_numbers_and_arrays_go_through_ops():
    from minilora import ops

    assert ops.add(1.5, 2.0).item() == 3.5
    y = ops.linear(np.ones((2, 3), np.float32), Tensor(np.ones((4, 3), np.float32)))
    np.testing.assert_array_equal(y.data, np.full((2, 4), 3.0, np.float32))


def test_relu_gives_positive_zero_for_negative_inputs():
    from minilora import ops

    out = ops.relu(Tensor(np.array([-2.0, 3.0]))).data
    assert np.signbit(out).tolist() == [False, False]

"""Tensor: an ndarray, its gradient, and its place in the computation graph (a Node).

The engine is reverse-mode automatic differentiation in the style of micrograd, over whole arrays.
An op (see ``minilora.ops``) computes its output with NumPy and hands [`Tensor.from_op`][] a
``backward`` closure that maps the output gradient ``g`` to one gradient per input, or ``None`` for
an input that needs none. [`Tensor.backward`][] walks the graph once in reverse topological order,
reduces broadcast gradients in one place ([`unbroadcast`][]), accumulates into ``.grad`` of
leaves, and frees each node as soon as it has been used, so activations die as the walk passes them.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from minilora.errors import GradError, ShapeError

Backward = Callable[[np.ndarray], Sequence["np.ndarray | None"]]

class _GradMode(threading.local):
    enabled = True  # per thread, as PyTorch: no_grad in one thread leaves the others recording


_grad_mode = _GradMode()


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Context manager (and decorator) under which ops build no graph at all, in this thread.

    Outputs computed inside have ``requires_grad=False`` and hold no reference to their inputs.
    """
    previous, _grad_mode.enabled = _grad_mode.enabled, False
    try:
        yield
    finally:
        _grad_mode.enabled = previous


@contextlib.contextmanager
def enable_grad() -> Iterator[None]:
    """Context manager under which ops record the graph again in this thread, even inside
    [`no_grad`][] (as PyTorch's ``enable_grad``): how activation checkpointing recomputes a
    block in the backward pass."""
    previous, _grad_mode.enabled = _grad_mode.enabled, True
    try:
        yield
    finally:
        _grad_mode.enabled = previous


def is_grad_enabled() -> bool:
    """Whether ops currently record the graph in this thread (False inside [`no_grad`][])."""
    return _grad_mode.enabled


def unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``grad`` over the axes that broadcasting added or stretched, so it has ``shape``.

    The one place broadcasting is undone: ops return gradients in the output's shape and the engine
    calls this before accumulating into an input.
    """
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    if grad.shape != shape:  # a backward returned something no broadcast explains: an engine bug
        raise ShapeError(f"gradient of shape {grad.shape} does not reduce to input shape {shape}")
    return grad


def _graph_freed(_g: np.ndarray) -> None:
    raise GradError(
        "backward through a graph that has already been freed; call backward(retain_graph=True) "
        "the first time to walk it again"
    )


class Node:
    """One op of the graph: its backward closure and the nodes of its inputs (``grad_fn``).

    The graph links nodes, never tensors: an op's output array lives only as long as its Tensor
    (and whatever a backward closure chose to save), so an activation no backward needs is freed
    as soon as the forward pass lets go of it. A leaf node (``backward`` None) stands for a tensor
    the user made; it and a ``retain_grad()`` node reach their tensor through a weak reference.
    """

    __slots__ = ("__weakref__", "backward", "dtype", "parents", "retain", "shape", "tensor")

    def __init__(self, backward: Backward | None, parents: tuple[Node | None, ...],
                 shape: tuple[int, ...], dtype: np.dtype, tensor=None):
        self.backward = backward  # g -> one gradient (or None) per parent
        self.parents = parents  # aligned with the op's inputs; None where no gradient flows
        self.shape, self.dtype = shape, dtype  # the output's, to reduce gradients back to it
        self.tensor = tensor  # weakref to the Tensor whose .grad this node fills, or None
        self.retain = False

    @property
    def name(self) -> str:
        """The op's name: ``"linear"`` for ``linear.<locals>.backward``, ``"leaf"`` for a leaf."""
        if self.backward is None:
            return "leaf"
        return getattr(self.backward, "__qualname__", "op").split(".")[0]

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.shape}>"


class Tensor:
    """An ``ndarray`` (``.data``) with a gradient (``.grad``) and a node in the autograd graph.

    ``Tensor(data, requires_grad=False, dtype=None)`` wraps ``np.asarray(data, dtype)``; the dtype
    is kept (a float32 array stays float32). Only floating-point tensors may require a gradient.
    """

    __slots__ = ("__weakref__", "_node", "data", "grad", "requires_grad")
    __array_priority__ = 1000  # so ndarray <op> Tensor defers to Tensor's reflected operators

    def __init__(self, data, requires_grad: bool = False, dtype=None):
        data = data.data if isinstance(data, Tensor) else data
        self.data: np.ndarray = np.asarray(data, dtype=dtype)
        if requires_grad and not np.issubdtype(self.data.dtype, np.floating):
            raise GradError(f"only floating-point tensors can require grad, got dtype "
                            f"{self.data.dtype}")
        self.grad: np.ndarray | None = None
        self.requires_grad = bool(requires_grad)
        self._node: Node | None = None

    @classmethod
    def from_op(cls, data: np.ndarray, parents: tuple[Tensor, ...], backward: Backward) -> Tensor:
        """The output of an op: a node with ``backward`` and its inputs' nodes, only if a gradient
        can flow. ``backward`` must not hold the input Tensors themselves (only what it needs)."""
        out = cls.__new__(cls)
        out.data, out.grad = data, None
        if _grad_mode.enabled and any(p.requires_grad for p in parents):
            nodes = tuple(p._graph_node() if p.requires_grad else None for p in parents)
            out.requires_grad, out._node = True, Node(backward, nodes, data.shape, data.dtype)
        else:
            out.requires_grad, out._node = False, None
        return out

    def _graph_node(self) -> Node:
        """This tensor's node; a leaf gets one the first time an op uses it."""
        node = self._node
        if node is None or (node.backward is None and (node.shape, node.dtype)
                                != (self.data.shape, self.data.dtype)):
            node = self._node = Node(None, (), self.data.shape, self.data.dtype,
                                     weakref.ref(self))
        return node

    @property
    def grad_fn(self) -> Node | None:
        """The node of the op that made this tensor (None for a leaf), as PyTorch's ``grad_fn``."""
        node = self._node
        return None if node is None or node.backward is None else node

    # ---- array-like facts ------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    def numel(self) -> int:
        """The number of elements, as PyTorch's ``numel()`` (the same as ``size``)."""
        return self.data.size

    @property
    def is_leaf(self) -> bool:
        """True for tensors made by the user (parameters, inputs), False for op outputs."""
        return self.grad_fn is None

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        body = np.array2string(self.data, precision=4, threshold=20)
        return f"Tensor({body}, dtype={self.dtype}{grad})"

    def numpy(self) -> np.ndarray:
        """The underlying array (not a copy)."""
        return self.data

    def item(self) -> float | int:
        """The value of a one-element tensor as a Python number."""
        if self.data.size != 1:
            raise ShapeError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.data.item()

    def detach(self) -> Tensor:
        """A new leaf sharing this tensor's data, cut off from the graph."""
        return Tensor(self.data)

    def retain_grad(self) -> Tensor:
        """Ask backward to also store ``.grad`` on this non-leaf tensor."""
        node = self.grad_fn
        if node is not None:
            node.retain, node.tensor = True, weakref.ref(self)
        return self

    def requires_grad_(self, flag: bool = True) -> Tensor:
        if flag and not np.issubdtype(self.data.dtype, np.floating):
            raise GradError(f"only floating-point tensors can require grad, got dtype {self.dtype}")
        self.requires_grad = bool(flag)
        return self

    # ---- reverse mode ----------------------------------------------------------------------
    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into ``.grad`` of every leaf that requires grad.

        grad: the upstream gradient, same shape as ``self``; may be omitted only for one-element
        tensors (then it is 1). The graph is freed as it is walked unless ``retain_graph``.
        """
        if not self.requires_grad:
            raise GradError("backward() on a tensor that does not require grad (no graph to walk)")
        if grad is None:
            if self.data.size != 1:
                raise GradError(
                    f"backward() without a gradient needs a scalar, got shape {self.shape}; "
                    "pass grad= of the same shape"
                )
            grad = np.ones_like(self.data)
        else:
            grad = np.array(grad.data if isinstance(grad, Tensor) else grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ShapeError(f"backward() grad has shape {grad.shape}, tensor has {self.shape}")

        order = _topological_order(self._graph_node())
        pending: dict[int, np.ndarray] = {id(order[-1]): grad}
        handed_out: set[int] = set()  # arrays already stored as some .grad: never store one twice
        for i in range(len(order) - 1, -1, -1):
            node, order[i] = order[i], None  # drop our reference so the node can die when done
            g = pending.pop(id(node), None)
            if g is None:
                continue
            if node.backward is None or node.retain:
                tensor = node.tensor() if node.tensor is not None else None
                if tensor is not None:  # a dead tensor's gradient has no one to read it
                    tensor._accumulate(g, handed_out)
            if node.backward is None:
                continue
            parent_grads = node.backward(g)
            for parent, pg in zip(node.parents, parent_grads, strict=True):
                if pg is None or parent is None:
                    continue
                pg = unbroadcast(pg, parent.shape)
                key = id(parent)
                pending[key] = pg if key not in pending else pending[key] + pg
            if not retain_graph:
                node.parents, node.backward = (), _graph_freed
            del g, parent_grads

    def _accumulate(self, g: np.ndarray, handed_out: set[int]) -> None:
        # Each .grad must own its memory, so optimizers and clipping may update it in place: an op
        # may pass the same array (or a view of it) to several inputs.
        if g.base is not None or id(g) in handed_out or g.dtype != self.dtype:
            g = np.array(g, dtype=self.dtype)
        handed_out.add(id(g))
        if self.grad is None:
            self.grad = g
        else:
            self.grad += g

    # ---- operators (the ops themselves live in minilora.ops) -------------------------------
    def __add__(self, other):
        return _ops.add(self, other)

    def __radd__(self, other):
        return _ops.add(other, self)

    def __sub__(self, other):
        return _ops.sub(self, other)

    def __rsub__(self, other):
        return _ops.sub(other, self)

    def __mul__(self, other):
        return _ops.mul(self, other)

    def __rmul__(self, other):
        return _ops.mul(other, self)

    def __truediv__(self, other):
        return _ops.div(self, other)

    def __rtruediv__(self, other):
        return _ops.div(other, self)

    def __pow__(self, exponent):
        return _ops.pow(self, exponent)

    def __rpow__(self, base):
        return _ops.pow(base, self)

    def __matmul__(self, other):
        return _ops.matmul(self, other)

    def __rmatmul__(self, other):
        return _ops.matmul(other, self)

    def __neg__(self):
        return _ops.neg(self)

    def __getitem__(self, index):
        return _ops.getitem(self, index)

    # comparisons give plain boolean arrays: they have no gradient
    def __lt__(self, other):
        return self.data < _raw(other)

    def __le__(self, other):
        return self.data <= _raw(other)

    def __gt__(self, other):
        return self.data > _raw(other)

    def __ge__(self, other):
        return self.data >= _raw(other)

    def __eq__(self, other):
        return self.data == _raw(other)

    def __ne__(self, other):
        return self.data != _raw(other)

    __hash__ = object.__hash__  # tensors are graph nodes: identity, not value, makes them hashable

    @property
    def T(self) -> Tensor:
        """All axes reversed, as ``ndarray.T``."""
        return _ops.transpose(self)

    def sum(self, axis=None, keepdims: bool = False) -> Tensor:
        return _ops.sum(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims: bool = False) -> Tensor:
        return _ops.mean(self, axis=axis, keepdims=keepdims)

    def max(self, axis=None, keepdims: bool = False) -> Tensor:
        return _ops.max(self, axis=axis, keepdims=keepdims)

    def reshape(self, *shape) -> Tensor:
        one = len(shape) == 1 and not isinstance(shape[0], int)  # t.reshape((2, 3)) or (2, 3)
        return _ops.reshape(self, shape[0] if one else shape)

    def transpose(self, *axes) -> Tensor:
        one = len(axes) == 1 and not isinstance(axes[0], int)  # t.transpose((1, 0)) or (1, 0)
        return _ops.transpose(self, axes[0] if one else axes or None)

    def exp(self) -> Tensor:
        return _ops.exp(self)

    def log(self) -> Tensor:
        return _ops.log(self)

    def tanh(self) -> Tensor:
        return _ops.tanh(self)

    def sqrt(self) -> Tensor:
        return _ops.sqrt(self)

    def relu(self) -> Tensor:
        return _ops.relu(self)

    def astype(self, dtype) -> Tensor:
        return _ops.astype(self, dtype)


def _raw(x):
    return x.data if isinstance(x, Tensor) else x


def _topological_order(root: Node) -> list[Node | None]:
    """Nodes reachable from ``root``, parents before children.

    Iterative depth-first search, so a 100,000-op chain does not touch Python's recursion limit.
    """
    order: list[Node | None] = []
    visited: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, parents_done = stack.pop()
        if parents_done:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        for parent in node.parents:
            if parent is not None and id(parent) not in visited:
                stack.append((parent, False))
    return order


def as_tensor(x, like: Tensor | None = None) -> Tensor:
    """``x`` as a Tensor; a Python or NumPy scalar takes ``like``'s dtype (float32 stays so)."""
    if isinstance(x, Tensor):
        return x
    if like is not None and np.ndim(x) == 0 and np.issubdtype(like.dtype, np.floating):
        return Tensor(np.asarray(x, dtype=like.dtype))
    return Tensor(x)


from minilora import ops as _ops  # noqa: E402  (ops import Tensor: bind them once both exist)

"""A tour of minilora's autograd engine on a tiny network.

    python examples/autograd_tour.py          # about a second; --small is accepted, changes nothing

1. One op: a forward value and a backward closure (its vector-Jacobian product).
2. The graph: every op output remembers its parents and its backward closure.
3. backward(): one walk in reverse topological order; a tensor used twice sums its gradients.
4. Broadcasting: a bias added to every row gets its gradient summed over the rows.
5. Frozen inputs get no gradient, and no_grad() builds no graph at all.
6. A tiny network (an MLP with a cross-entropy loss) and the gradients of all its parameters.
7. A finite-difference check of every one of those gradients, in float64.
8. A LoRA layer: only A and B get gradients, equal to their closed forms.

See docs/engine.md for the same tour through the source code.
"""

import argparse

import numpy as np

from minilora import Tensor, no_grad, ops
from minilora.lora import LoRALinear
from minilora.nn import Linear

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--small", action="store_true", help="accepted for CI; the example is small")
parser.parse_args()
np.set_printoptions(precision=4, suppress=True)


def section(title: str) -> None:
    print(f"\n== {title}")


# ---- 1. One op ---------------------------------------------------------------------------------
section("1. one op: y = a * b, and its vector-Jacobian product")
a = Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)   # (3,)
b = Tensor(np.array([4.0, 5.0, 6.0]), requires_grad=True)   # (3,)
y = a * b                                                   # ops.mul: forward is a.data * b.data
g = np.array([1.0, 0.1, 0.01])                              # an upstream gradient dL/dy, (3,)
y.backward(g)                                               # mul's backward: (g * b, g * a)
print("a * b =", y.data, "  dL/da = g * b =", a.grad, "  dL/db = g * a =", b.grad)
assert np.allclose(a.grad, g * b.data) and np.allclose(b.grad, g * a.data)

# ---- 2. The graph ------------------------------------------------------------------------------
section("2. the graph: each output points to a node: its backward closure and its inputs' nodes")
x = Tensor(np.array(2.0), requires_grad=True)
u = x * x                  # u = x^2
v = ops.tanh(u)            # v = tanh(x^2)
w = v + x                  # w = tanh(x^2) + x: x is used twice


def show(node, name: str, depth: int = 0) -> None:
    """Print the graph under a node. Nodes hold no data: a leaf reaches its tensor (weakly)."""
    if node.backward is None:
        print(f"{'    ' * depth}{name}: leaf, value {node.tensor().data:.4f}")
        return
    print(f"{'    ' * depth}{name}: {node.name}, shape {node.shape}")
    for i, parent in enumerate(node.parents):
        show(parent, f"input {i}", depth + 1)


show(w.grad_fn, "w")

# ---- 3. backward() ------------------------------------------------------------------------------
section("3. backward(): reverse topological order, gradients summed over uses")
w.backward()               # a scalar: the upstream gradient is 1
by_hand = (1 - np.tanh(4.0) ** 2) * 2 * 2.0 + 1   # dw/dx = tanh'(x^2) * 2x + 1
print(f"dw/dx = {x.grad:.6f}   by hand: {by_hand:.6f}")
assert np.isclose(x.grad, by_hand)
print(f"the walk freed the graph behind it: w's node now has {len(w.grad_fn.parents)} inputs")
print("(a second backward() through it needs retain_graph=True the first time)")

# ---- 4. Broadcasting ----------------------------------------------------------------------------
section("4. broadcasting: the engine sums the gradient over the stretched axes")
rows = Tensor(np.ones((4, 3)), requires_grad=True)         # (N, C) = (4, 3)
bias = Tensor(np.array([0.1, 0.2, 0.3]), requires_grad=True)  # (C,): broadcast to (4, 3)
(rows + bias).sum().backward()
print("bias.grad =", bias.grad, "(each entry was used by 4 rows)")
assert bias.grad.shape == (3,) and np.all(bias.grad == 4)

# ---- 5. Frozen inputs and no_grad --------------------------------------------------------------
section("5. a frozen input gets no gradient; no_grad() builds no graph")
W = Tensor(np.ones((2, 3)))                                 # requires_grad=False: frozen
xin = Tensor(np.arange(3.0), requires_grad=True)
ops.linear(xin[None, :], W).sum().backward()               # x W^T: dW is never computed
print("W.grad =", W.grad, "  x.grad =", xin.grad)
assert W.grad is None
with no_grad():
    z = xin * 2
print("inside no_grad: z.requires_grad =", z.requires_grad, "(no parents, no closure kept)")
assert not z.requires_grad

# ---- 6. A tiny network ------------------------------------------------------------------------
section("6. a tiny network: x -> Linear(4, 8) -> tanh -> Linear(8, 3) -> cross-entropy")
rng = np.random.default_rng(0)
fc1 = Linear(4, 8, dtype="float64", rng=rng)                # W1: (8, 4), b1: (8,)
fc2 = Linear(8, 3, dtype="float64", rng=rng)                # W2: (3, 8), b2: (3,)
params = {"fc1.weight": fc1.weight, "fc1.bias": fc1.bias,
          "fc2.weight": fc2.weight, "fc2.bias": fc2.bias}
inputs = rng.normal(size=(5, 4))                            # (N, in) = (5, 4)
labels = rng.integers(0, 3, size=5)                         # (N,): a class per row


def loss_fn() -> Tensor:
    hidden = ops.tanh(fc1(inputs))                          # (5, 8)
    logits = fc2(hidden)                                    # (5, 3)
    return ops.cross_entropy(logits, labels)                # (): mean over the 5 rows


loss = loss_fn()
loss.backward()
print(f"loss = {loss.item():.4f}")
for name, p in params.items():
    print(f"{name:>10}: {p.shape}, |grad| = {np.linalg.norm(p.grad):.4f}")

# ---- 7. Finite differences ---------------------------------------------------------------------
section("7. every gradient against central finite differences (float64, step 1e-6)")
step = 1e-6
for name, p in params.items():
    numeric = np.zeros_like(p.data)
    for i in np.ndindex(p.shape):
        saved = p.data[i]
        with no_grad():
            p.data[i] = saved + step
            up = loss_fn().item()
            p.data[i] = saved - step
            down = loss_fn().item()
        p.data[i] = saved
        numeric[i] = (up - down) / (2 * step)
    err = np.abs(numeric - p.grad).max()
    print(f"{name:>10}: max |autograd - finite difference| = {err:.1e}")
    assert err < 1e-8

# ---- 8. A LoRA layer ---------------------------------------------------------------------------
section("8. a LoRA layer: gradients for A and B only, equal to their closed forms")
layer = LoRALinear(Linear(4, 6, dtype="float64", rng=1), r=2, lora_alpha=4, rng=1)
layer.lora_B.data = rng.normal(size=(6, 2))                 # as if trained: B != 0
xs = rng.normal(size=(5, 4))                                # (N, in)
G = rng.normal(size=(5, 6))                                 # dL/dy, (N, out)
layer(xs).backward(G)
s, A, B = layer.scaling, layer.lora_A.data, layer.lora_B.data
h = xs @ A.T                                                # (N, r)
print("weight.grad:", layer.weight.grad, "  bias.grad:", layer.bias.grad)
print("max |dL/dB - s G^T h|     =", np.abs(layer.lora_B.grad - s * G.T @ h).max())
print("max |dL/dA - s (G B)^T x| =", np.abs(layer.lora_A.grad - s * (G @ B).T @ xs).max())
assert layer.weight.grad is None and layer.bias.grad is None
np.testing.assert_allclose(layer.lora_B.grad, s * G.T @ h, rtol=1e-12)
np.testing.assert_allclose(layer.lora_A.grad, s * (G @ B).T @ xs, rtol=1e-12)
print("\nall checks passed")

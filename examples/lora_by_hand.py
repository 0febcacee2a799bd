"""LoRA on one layer, in plain numbers.

    python examples/lora_by_hand.py          # instant; --small is accepted and changes nothing

1. A 3x3 weight and a rank-1 adapter: 9 weights against 6 LoRA parameters (the usual first example).
2. The two paths of the forward pass, y = x W^T + b + s (x A^T) B^T, and why B = 0 changes nothing.
3. One gradient step by hand, with the closed forms dB = s G^T h and dA = s (G B)^T x.
4. Merging, W' = W + s B A: a plain linear layer computes the same outputs.
5. The same numbers from minilora's LoRALinear.
6. Fitting a target update: rank r reaches the best rank-r approximation, full rank reaches it all.
7. Counting: a 4096 x 4096 weight with r = 4 trains 1/512 of its entries.
8. Row-vector notation, y = x · W with A: M x r and B: r x N, is the transpose of ours.

Everything here is NumPy; only step 5 imports minilora.
"""

import argparse
from fractions import Fraction

import numpy as np
import scipy.linalg

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--small", action="store_true", help="accepted for CI; the example is small")
parser.parse_args()
np.set_printoptions(precision=4, suppress=True)


def section(title: str) -> None:
    print(f"\n== {title}")


# ---- 1. A weight and its adapter ---------------------------------------------------------------
section("1. a 3x3 weight and a rank-1 adapter")
W = np.array([[1.0, 2.0, 0.0],
              [0.0, 1.0, 3.0],
              [2.0, 0.0, 1.0]])           # (out, in) = (3, 3): frozen
b = np.array([0.5, -0.5, 0.0])            # (out,): frozen
r, lora_alpha = 1, 2.0
s = lora_alpha / r                        # the scaling, s = alpha / r = 2
A = np.array([[0.5, -1.0, 0.25]])         # (r, in) = (1, 3): random at the start
B = np.zeros((3, r))                      # (out, r) = (3, 1): zero at the start
print("W =\n", W, "\nA =", A, "\nB^T =", B.T, f"\ns = alpha / r = {s}")
print(f"weights: {W.size}, LoRA parameters: {A.size + B.size} = r (in + out) = {r * (3 + 3)}")

# ---- 2. The two paths --------------------------------------------------------------------------
section("2. the two paths: y = x W^T + b  +  s (x A^T) B^T")
x = np.array([[1.0, 2.0, 3.0],
              [0.0, -1.0, 1.0]])          # (N, in) = (2, 3): two input rows
frozen_path = x @ W.T + b                 # (2, 3)
h = x @ A.T                               # (2, r): each row squeezed to r numbers
low_rank_path = s * h @ B.T               # (2, 3): and expanded again
y = frozen_path + low_rank_path
print("frozen path  x W^T + b    =\n", frozen_path)
print("h = x A^T                 =", h.ravel())
print("low-rank path s h B^T     =\n", low_rank_path)
assert np.array_equal(y, frozen_path)     # B = 0: exactly the pretrained layer
print("B = 0, so y is exactly the frozen layer's output: training starts from the base model.")

# ---- 3. One gradient step, by hand --------------------------------------------------------------
section("3. one gradient step: only A and B get gradients")
target = frozen_path + np.array([[1.0, 0.0, -1.0],
                                 [0.5, 0.0, -0.5]])  # what we want the layer to output
G = y - target                            # (N, out): dL/dy for L = 0.5 * ||y - target||^2
dB = s * G.T @ h                          # (out, r) = s G^T h
dA = s * (G @ B).T @ x                    # (r, in)  = s (G B)^T x: zero while B = 0
print("dL/dB^T =", dB.T, "   dL/dA =", dA, "(zero: B is still 0)")
print("no dL/dW is computed: W is frozen. (Had A been 0 too, both gradients would be 0 forever.)")
lr = 0.1
B = B - lr * dB                           # A does not move on the first step, B does
A = A - lr * dA
y1 = x @ W.T + b + s * (x @ A.T) @ B.T
loss0, loss1 = 0.5 * np.sum((y - target) ** 2), 0.5 * np.sum((y1 - target) ** 2)
print(f"loss {loss0:.4f} -> {loss1:.4f} after one SGD step (lr {lr})")
assert loss1 < loss0

# ---- 4. Merging -------------------------------------------------------------------------------
section("4. merge: W' = W + s B A, one plain matrix again")
delta_W = s * B @ A                       # (out, in): the update, rank <= r
W_merged = W + delta_W
print("s B A =\n", delta_W, f"\nrank of s B A: {np.linalg.matrix_rank(delta_W)}")
y_merged = x @ W_merged.T + b             # one product per row, as the base model
print("max |merged - two paths| =", np.abs(y_merged - y1).max())
np.testing.assert_allclose(y_merged, y1, rtol=1e-12, atol=1e-12)
print("after merging, inference costs exactly what the base model costs.")

# ---- 5. The same with minilora ----------------------------------------------------------------
section("5. the same numbers from minilora.lora.LoRALinear")
from minilora.lora import LoRALinear  # noqa: E402  (imported here: steps 1-4 need only NumPy)
from minilora.nn import Linear  # noqa: E402

layer = LoRALinear(Linear(3, 3, dtype="float64", rng=0), r=1, lora_alpha=lora_alpha, rng=0)
layer.weight.data[...], layer.bias.data[...] = W, b
layer.lora_A.data[...], layer.lora_B.data[...] = A, B
out = layer(x)                            # one fused op: x W^T + b + s (x A^T) B^T
np.testing.assert_allclose(out.data, y1, rtol=1e-12)
layer.merge()
np.testing.assert_allclose(layer.weight.data, W_merged, rtol=1e-12)
print("LoRALinear's output and merged weight equal the hand computation.")

# ---- 6. What rank can learn --------------------------------------------------------------------
section("6. fitting a target update: rank r reaches the best rank-r approximation")
rng = np.random.default_rng(0)
target_dW = rng.normal(size=(3, 3))       # a full-rank change, as full fine-tuning could make
sigma = scipy.linalg.svdvals(target_dW)   # its singular values, largest first
print("singular values of the target update:", sigma)
for rank in (1, 2, 3):
    A_r = rng.uniform(-1 / np.sqrt(3), 1 / np.sqrt(3), (rank, 3))  # PEFT's "kaiming" init
    B_r = np.zeros((3, rank))
    for _ in range(3000):                 # gradient descent on 0.5 ||s B A - target||^2
        R = s * B_r @ A_r - target_dW     # (out, in): the residual
        B_r, A_r = B_r - 0.05 * s * R @ A_r.T, A_r - 0.05 * s * B_r.T @ R
    error = np.linalg.norm(s * B_r @ A_r - target_dW)
    best = np.sqrt(np.sum(sigma[rank:] ** 2))  # Eckart-Young: the best any rank-r matrix can do
    print(f"r={rank}: ||s B A - target||_F = {error:.4f}, best possible at rank {rank}: {best:.4f}")
    assert abs(error - best) < 1e-3
print("with r = min(in, out) = 3, LoRA can express any update: full rank is full fine-tuning.")

# ---- 7. Counting --------------------------------------------------------------------------------
section("7. counting: r (in + out) against in * out")
for name, n_in, n_out, rank in (("the small worked example", 3, 3, 1),
                                 ("GPT-2 small's c_attn", 768, 2304, 8),
                                 ("the large worked example", 4096, 4096, 4)):
    weights, lora = n_in * n_out, rank * (n_in + n_out)
    print(f"{n_out:>5} x {n_in:<5} r={rank}: {weights:>11,} weights, {lora:>6,} LoRA parameters, "
          f"{Fraction(lora, weights)} of them  ({name})")
assert 4096 * 4096 == 16_777_216 and 4 * (4096 + 4096) == 32_768 == 16_777_216 // 512

# ---- 8. Row-vector notation -------------------------------------------------------------------
section("8. row-vector notation: y = x · (W + A · B), W: M x N with M = in, N = out")
W_row, A_row, B_row = W.T, A.T, B.T    # (M, N), (M, r), (r, N): the transposes of ours
y_row = x @ (W_row + s * A_row @ B_row) + b
np.testing.assert_allclose(y_row, y1, rtol=1e-12)
np.testing.assert_allclose(A_row @ B_row, (B @ A).T)  # row-vector ΔW = A · B is our (B A)^T
print("row-vector: A is", A_row.shape, "B is", B_row.shape, "ΔW = A·B is", (A_row @ B_row).shape)
print("ours: A is", A.shape, "B is", B.shape, "ΔW = B A is", (B @ A).shape, "(the transpose)")
print("\nall checks passed")

"""Reference numbers that do not depend on the machine: the golden vectors' arithmetic.

Floating-point code gives different last bits on different CPUs (BLAS kernels sum in different
orders; NumPy's SIMD ``exp`` and ``tanh`` round differently per instruction set). This module
computes with Python's ``decimal`` at 60 significant digits instead: every operation, ``exp``,
``ln`` and ``sqrt`` included, is specified to the last digit (the General Decimal Arithmetic
specification, which ``libmpdec`` implements in integer arithmetic, correctly rounded), and every
sum is taken in one fixed order. The same inputs give the same 60 digits on every machine, and
the float64 written out is that value correctly rounded (``float(Decimal)``): one rounding of a
value within about ``n 10^-59`` (relative) of the exact one after ``n`` operations.

Two users: the LoRA linear layer's closed forms ([`lora_linear_reference`][]) and a tiny GPT-2
with LoRA ([`gpt_reference`][]), differentiated by a scalar reverse mode ([`Num`][]) that
shares nothing with minilora's engine, so the two check each other.
"""

from __future__ import annotations

import decimal
from decimal import Decimal

import numpy as np

CONTEXT = decimal.Context(prec=60, rounding=decimal.ROUND_HALF_EVEN, Emin=-10**6, Emax=10**6,
                          traps=[decimal.InvalidOperation, decimal.DivisionByZero,
                                 decimal.Overflow])
PI = Decimal("3.14159265358979323846264338327950288419716939937510582097494459230781640628")
GELU_CUBIC = Decimal("0.044715")  # GPT-2's tanh approximation, as its paper writes it
ZERO, ONE = Decimal(0), Decimal(1)


def decimals(a: np.ndarray) -> list:
    """A float64 array as nested lists of Decimal, exactly (every float64 is a finite decimal)."""
    return np.vectorize(Decimal, otypes=[object])(np.asarray(a, dtype=np.float64)).tolist()


def to_float64(values) -> np.ndarray:
    """Nested lists of Decimal (or Num) as a float64 array, each correctly rounded."""
    flat = np.array(values, dtype=object)
    return np.vectorize(lambda v: float(getattr(v, "value", v)), otypes=[np.float64])(flat)


# ---- the LoRA linear layer, in closed form --------------------------------------------------

def _mm(a, b):
    """a: (n, k) @ b: (k, m), lists of Decimal; each sum in order."""
    cols = list(zip(*b, strict=True))
    return [[sum((x * y for x, y in zip(row, col, strict=True)), ZERO) for col in cols]
            for row in a]


def _t(a):
    return [list(col) for col in zip(*a, strict=True)]


def _ew(f, a, b):
    return [[f(x, y) for x, y in zip(ra, rb, strict=True)] for ra, rb in zip(a, b, strict=True)]


def lora_linear_reference(x, W, b, A, B, s: Decimal, mask, G) -> dict[str, list]:
    """The closed forms of DESIGN's LoRA layer (``minilora/ops/lora_linear.py``), in Decimal.

    x, G: (N, in), (N, out) rows; W: (out, in); b: (out,) or None; A: (r, in); B: (out, r);
    mask: (N, in) or None (the dropout mask, 0 or 1/(1-p)); s: the scaling. Lists of Decimal in,
    lists of Decimal out: y = x W^T + b + s h B^T with h = d(x) A^T, d(x) = x * mask; u = G B;
    dx = G W + s d(u A); dA = s u^T d(x); dB = s G^T h; db = sum_n G; W' = W + s B A.
    """
    with decimal.localcontext(CONTEXT):
        xd = x if mask is None else _ew(lambda p, q: p * q, x, mask)
        h = _mm(xd, _t(A))
        low = _mm(h, _t(B))
        y = _ew(lambda p, q: p + s * q, _mm(x, _t(W)), low)
        if b is not None:
            y = [[v + bo for v, bo in zip(row, b, strict=True)] for row in y]
        u = _mm(G, B)
        du = [[s * v for v in row] for row in _mm(u, A)]
        dx = _ew(lambda p, q: p + q, _mm(G, W),
                 du if mask is None else _ew(lambda p, q: p * q, du, mask))
        out = {"y": y, "dx": dx, "dA": [[s * v for v in row] for row in _mm(_t(u), xd)],
               "dB": [[s * v for v in row] for row in _mm(_t(G), h)],
               "merged_weight": _ew(lambda p, q: p + s * q, W, _mm(B, A))}
        if b is not None:
            out["db"] = [sum(col, ZERO) for col in zip(*G, strict=True)]
        return out


# ---- a scalar reverse mode over Decimal -----------------------------------------------------

class Num:
    """A scalar of the reference graph: its value, and (parent, d value / d parent) edges."""

    __slots__ = ("edges", "grad", "value")

    def __init__(self, value: Decimal, edges: tuple = ()):
        self.value, self.edges, self.grad = value, edges, ZERO


def add(a: Num, b: Num) -> Num:
    return Num(a.value + b.value, ((a, ONE), (b, ONE)))


def shift(a: Num, c: Decimal) -> Num:
    """a + c for a constant c."""
    return Num(a.value + c, ((a, ONE),))


def mul(a: Num, b: Num) -> Num:
    return Num(a.value * b.value, ((a, b.value), (b, a.value)))


def scale(a: Num, c: Decimal) -> Num:
    """a * c for a constant c."""
    return Num(a.value * c, ((a, c),))


def dot(xs: list, ys: list) -> Num:
    """sum_i x_i y_i, summed in order, as one node."""
    value = sum((x.value * y.value for x, y in zip(xs, ys, strict=True)), ZERO)
    return Num(value, tuple((x, y.value) for x, y in zip(xs, ys, strict=True))
               + tuple((y, x.value) for x, y in zip(xs, ys, strict=True)))


def total(xs: list) -> Num:
    return Num(sum((x.value for x in xs), ZERO), tuple((x, ONE) for x in xs))


def exp(a: Num) -> Num:
    e = a.value.exp()
    return Num(e, ((a, e),))


def log(a: Num) -> Num:
    return Num(a.value.ln(), ((a, ONE / a.value),))


def tanh(a: Num) -> Num:
    e = (2 * a.value).exp()
    t = (e - 1) / (e + 1)
    return Num(t, ((a, 1 - t * t),))


def rsqrt(a: Num) -> Num:
    """a^(-1/2); its derivative -a^(-3/2) / 2."""
    r = ONE / a.value.sqrt()
    return Num(r, ((a, -r / (2 * a.value)),))


def div(a: Num, b: Num) -> Num:
    q = a.value / b.value
    return Num(q, ((a, ONE / b.value), (b, -q / b.value)))


def backward(root: Num) -> None:
    """d root / d node into every node's ``grad``, children before parents (one fixed order)."""
    order, expanded, stack = [], set(), [(root, False)]
    while stack:  # a depth-first post-order: every node after all of its parents
        node, done = stack.pop()
        if done:
            order.append(node)
        elif id(node) not in expanded:
            expanded.add(id(node))
            stack.append((node, True))
            stack += [(parent, False) for parent, _ in node.edges if id(parent) not in expanded]
    root.grad = ONE
    for node in reversed(order):
        for parent, local in node.edges:
            parent.grad += node.grad * local


# ---- a tiny GPT-2 with LoRA, as minilora's GPT (nanoGPT) computes it ------------------------

def _leaves(a: np.ndarray):
    return np.vectorize(lambda v: Num(Decimal(v)), otypes=[object])(a).tolist()


def _linear(x: list, W: list, b: list | None, lora: tuple | None) -> list:
    """x: (C,) Nums -> (out,): x W^T + b + s (x A^T) B^T."""
    y = [dot(x, row) for row in W]
    if lora is not None:
        A, B, s = lora
        h = [dot(x, row) for row in A]
        y = [add(v, scale(dot(h, row), s)) for v, row in zip(y, B, strict=True)]
    return y if b is None else [add(v, bo) for v, bo in zip(y, b, strict=True)]


def _layer_norm(x: list, w: list, b: list, eps: Decimal) -> list:
    n = Decimal(len(x))
    mean = scale(total(x), ONE / n)
    d = [add(v, scale(mean, -ONE)) for v in x]
    var = scale(total([mul(v, v) for v in d]), ONE / n)
    r = rsqrt(shift(var, eps))
    return [add(mul(mul(v, r), wi), bi) for v, wi, bi in zip(d, w, b, strict=True)]


def _gelu(x: Num) -> Num:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    c = (2 / PI).sqrt()
    inner = scale(add(x, scale(mul(mul(x, x), x), GELU_CUBIC)), c)
    return scale(mul(x, shift(tanh(inner), ONE)), Decimal("0.5"))


def _attention(qkv: list, n_head: int) -> list:
    """qkv: (T, 3C) -> (T, C), causal, softmax(q k^T / sqrt(hd)) v per head."""
    T, C = len(qkv), len(qkv[0]) // 3
    hd = C // n_head
    inv = ONE / Decimal(hd).sqrt()
    out = [[None] * C for _ in range(T)]
    for h in range(n_head):
        q = [row[h * hd:(h + 1) * hd] for row in qkv]
        k = [row[C + h * hd:C + (h + 1) * hd] for row in qkv]
        v = [row[2 * C + h * hd:2 * C + (h + 1) * hd] for row in qkv]
        for i in range(T):
            scores = [scale(dot(q[i], k[j]), inv) for j in range(i + 1)]
            top = max(s.value for s in scores)  # a constant shift: the softmax is unchanged
            e = [exp(shift(s, -top)) for s in scores]
            z = total(e)
            p = [div(ej, z) for ej in e]
            for d in range(hd):
                out[i][h * hd + d] = dot(p, [v[j][d] for j in range(i + 1)])
    return out


def _residual(x: list, y: list) -> list:
    """x + y for (T, C) lists of Nums."""
    return [[add(u, v) for u, v in zip(a, b, strict=True)] for a, b in zip(x, y, strict=True)]


def _cross_entropy(logits: list, target: int) -> Num:
    top = max(v.value for v in logits)
    lse = shift(log(total([exp(shift(v, -top)) for v in logits])), top)
    return add(lse, scale(logits[target], -ONE))


def gpt_reference(params: dict[str, np.ndarray], lora: dict[str, tuple], config, idx: np.ndarray,
                  targets: np.ndarray) -> dict[str, np.ndarray]:
    """Logits (B, T, V), the mean cross-entropy loss and its gradient for every parameter.

    params: minilora's parameter names -> float64 arrays (Linear weights (out, in)), without
        ``lm_head.weight`` (tied to ``transformer.wte.weight``); lora: layer name -> (A, B, s)
        with the float64 arrays A (r, in), B (out, r) and the scaling s as a Decimal.
    Returns float64 arrays, correctly rounded: "logits", "loss", and "grad:NAME" for every
    parameter and every ``NAME.lora_A`` / ``NAME.lora_B``.
    """
    with decimal.localcontext(CONTEXT):
        p = {name: _leaves(a) for name, a in params.items()}
        lo = {name: (_leaves(A), _leaves(B), s) for name, (A, B, s) in lora.items()}
        eps = Decimal(float(config.layer_norm_epsilon))

        def linear(name, x):
            return _linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"), lo.get(name))

        logits, losses = [], []
        for b in range(idx.shape[0]):
            x = [[add(e, q) for e, q in zip(p["transformer.wte.weight"][tok],
                                            p["transformer.wpe.weight"][t], strict=True)]
                 for t, tok in enumerate(idx[b])]
            for i in range(config.n_layer):
                h = f"transformer.h.{i}"
                a = [linear(f"{h}.attn.c_attn", _layer_norm(row, p[f"{h}.ln_1.weight"],
                                                            p[f"{h}.ln_1.bias"], eps)) for row in x]
                y = [linear(f"{h}.attn.c_proj", row) for row in _attention(a, config.n_head)]
                x = _residual(x, y)
                m = [[_gelu(v) for v in linear(f"{h}.mlp.c_fc", _layer_norm(
                    row, p[f"{h}.ln_2.weight"], p[f"{h}.ln_2.bias"], eps))] for row in x]
                y = [linear(f"{h}.mlp.c_proj", row) for row in m]
                x = _residual(x, y)
            rows = [_layer_norm(row, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"],
                                eps) for row in x]
            out = [[dot(row, w) for w in p["transformer.wte.weight"]] for row in rows]
            logits.append(out)
            losses += [_cross_entropy(row, int(t)) for row, t in zip(out, targets[b], strict=True)]
        loss = scale(total(losses), ONE / Decimal(len(losses)))
        backward(loss)
        result = {"logits": to_float64(logits), "loss": to_float64(loss.value)}
        for name, leaves in p.items():
            result[f"grad:{name}"] = _grads(leaves)
        for name, (A, B, _) in lo.items():
            result[f"grad:{name}.lora_A"], result[f"grad:{name}.lora_B"] = _grads(A), _grads(B)
        return result


def _grads(leaves) -> np.ndarray:
    flat = np.array(leaves, dtype=object)
    return np.vectorize(lambda n: float(n.grad), otypes=[np.float64])(flat)

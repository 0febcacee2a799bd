"""The fast SwiGLU: ``minilora.ops.swiglu.swiglu``'s equation in row blocks on the engine's
threads, with one exp per element."""

from __future__ import annotations

import numpy as np

from minilora.ops.backend.blocks import for_blocks, rows_per_block
from minilora.ops.swiglu import check_swiglu, sigmoid
from minilora.tensor import Tensor


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up.   gate, up: (..., I).

    The same function as ``minilora.ops.swiglu.swiglu``, in row blocks on the engine's threads.
    Keeps silu(gate) (d_up needs it) and reads s back as silu(gate) / gate, as GELU reads its
    sigmoid back from its output: no second activation-sized array, no second exp. At gate = 0,
    s = sigmoid(0) = 1/2.
    """
    check_swiglu(gate, up)
    shape = gate.shape
    z = gate.data.reshape(-1, shape[-1]) if gate.ndim else gate.data.reshape(1, 1)
    u = up.data.reshape(z.shape)
    a, y = np.empty_like(z), np.empty_like(z)  # silu(gate), kept; the output

    def forward_block(lo, hi):
        s = sigmoid(z[lo:hi])
        np.multiply(z[lo:hi], s, out=a[lo:hi])
        np.multiply(a[lo:hi], u[lo:hi], out=y[lo:hi])

    block = rows_per_block(*z.shape)
    for_blocks(forward_block, len(z), block)
    need_gate, need_up = gate.requires_grad, up.requires_grad

    def backward(g):
        g2 = g.reshape(z.shape)
        d_gate = np.empty_like(z) if need_gate else None
        d_up = np.empty_like(z) if need_up else None

        def backward_block(lo, hi):
            ab, gb = a[lo:hi], g2[lo:hi]
            if need_up:
                np.multiply(gb, ab, out=d_up[lo:hi])
            if need_gate:
                zb = z[lo:hi]
                s = np.divide(ab, zb, out=np.full_like(zb, 0.5), where=zb != 0)
                t = 1.0 - s
                t *= ab
                t += s  # s + silu (1 - s) = silu'(gate)
                t *= u[lo:hi]
                np.multiply(gb, t, out=d_gate[lo:hi])

        for_blocks(backward_block, len(z), block)
        return (None if d_gate is None else d_gate.reshape(shape),
                None if d_up is None else d_up.reshape(shape))

    return Tensor.from_op(y.reshape(shape), (gate, up), backward)

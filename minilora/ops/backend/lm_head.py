"""The fast final layer norm + ``lm_head`` + cross-entropy: ``minilora.ops.lm_head``'s equation
in row chunks, so that the (N, V) logits and their gradient are never held whole.

The loss is a scalar, so its gradient with respect to everything is the gradient for g = 1 times
g. The forward pass computes it, chunk by chunk, while each chunk's logits are at hand (their
softmax, less the one-hot targets, is the logits' gradient), as Liger-Kernel's fused linear
cross-entropy does: no logits saved, none recomputed. What the backward pass then holds is the
gradients themselves: dx (N, C), the layer norm's (C,), and dW (V, C) only if W is trained (full
fine-tuning; LoRA's frozen W gets none). Each is handed out once and forgotten.
"""

from __future__ import annotations

import numpy as np

from minilora.ops.backend import products
from minilora.ops.backend.blocks import BLOCK_ELEMENTS, for_blocks, rows_per_block
from minilora.ops.backend.normalization import normalize_rows, normalize_rows_backward
from minilora.ops.backend.products import mm
from minilora.ops.lm_head import check_lm_head
from minilora.tensor import Tensor, is_grad_enabled

# The logits of one row chunk: 32 MiB of float32. Large enough that W (V, C) is read from memory
# a few times per step, not once per few rows; small beside the (N, V) logits of a real batch.
CHUNK_ELEMENTS = 1 << 23


def chunk_rows(n: int, vocab: int) -> int:
    """Rows of one chunk: about CHUNK_ELEMENTS logits, at least one row. A function of the shape
    alone, so the chunks (and the bits of dW's sum over them) never depend on the threads."""
    return max(1, min(n, CHUNK_ELEMENTS // max(vocab, 1)))


def lm_head_cross_entropy(x: Tensor, ln_weight: Tensor | None, ln_bias: Tensor | None,
                          weight: Tensor, targets, eps: float = 1e-5,
                          ignore_index: int | None = None) -> Tensor:
    """Mean cross-entropy of the logits LN(x) W^T against ``targets``: the same function as
    ``minilora.ops.lm_head.lm_head_cross_entropy`` (its module docstring has the VJP)."""
    x2, t, rows = check_lm_head(x, ln_weight, ln_bias, weight, targets, ignore_index)
    params = (ln_weight, ln_bias)
    parents = (x,) + tuple(p for p in params if p is not None) + (weight,)
    wanted = is_grad_enabled() and any(p.requires_grad for p in parents)
    need = {"x": x.requires_grad, "w": ln_weight is not None and ln_weight.requires_grad,
            "b": ln_bias is not None and ln_bias.requires_grad, "W": weight.requires_grad}
    if not wanted:
        need = dict.fromkeys(need, False)
    lnw, lnb = (None if p is None else p.data for p in params)

    def run():  # (loss, the gradients for g = 1 of the parents that want one)
        return _loss_and_grads(x2, lnw, lnb, weight.data, t, rows, eps, need)

    loss, grads = run()
    x_shape = x.shape

    def backward(g):
        nonlocal grads
        found, grads = grads if grads is not None else run()[1], None  # handed out once: forgot
        gx, gw, gb, gW = found
        out = [None if gx is None else gx.reshape(x_shape)]
        out += [gw] if ln_weight is not None else []
        out += [gb] if ln_bias is not None else []
        out += [gW]
        if g != 1:
            out = [None if a is None else a * g for a in out]
        return out

    return Tensor.from_op(loss, parents, backward)


def _loss_and_grads(x2, lnw, lnb, w, t, rows, eps, need):
    """The loss and (dx, dln_weight, dln_bias, dW) for g = 1, None where not needed."""
    n, c = x2.shape
    vocab = w.shape[0]
    dtype = x2.dtype
    h, xhat, rstd = normalize_rows(x2, lnw, lnb, eps)
    need_h = need["x"] or need["w"] or need["b"]
    any_grad = need_h or need["W"]
    nll = np.zeros(n, dtype)
    counted = np.zeros(n, bool)
    counted[rows] = True
    inv_count = 1.0 / max(len(rows), 1)  # a Python float: the arrays keep their dtype
    dh = np.empty_like(h) if need_h else None
    dW = np.empty_like(w) if need["W"] else None
    slice_rows = rows_per_block(vocab, c, BLOCK_ELEMENTS)  # dW's rows per block of its sum
    step = chunk_rows(n, vocab)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        z = mm(h[lo:hi], w.T)  # (rows, V): this chunk's logits, then their gradient in place

        def softmax_block(a, b, lo=lo, z=z):
            zb = z[a:b]
            zb -= zb.max(axis=1, keepdims=True)
            tb, kept = t[lo + a:lo + b], counted[lo + a:lo + b]
            ar = np.flatnonzero(kept)
            picked = zb[ar, tb[ar]]  # shifted logits of the targets
            np.exp(zb, out=zb)
            total = zb.sum(axis=1)
            nll[lo + a:lo + b][ar] = np.log(total[ar]) - picked
            if any_grad:  # (P - Y) / n, P = exp / total in the same pass as the 1 / n
                zb *= (inv_count / total)[:, None]
                zb[ar, tb[ar]] -= inv_count
                zb[~kept] = 0.0  # ignored positions get no gradient

        for_blocks(softmax_block, hi - lo, rows_per_block(hi - lo, vocab))
        if need_h:
            dh[lo:hi] = mm(z, w)  # (rows, C)
        if need["W"]:
            def add_dw(a, b, first=lo == 0, z=z, hc=h[lo:hi]):
                part = products.matmul(z[:, a:b].T, hc)  # (b - a, C)
                if first:
                    dW[a:b] = part
                else:
                    dW[a:b] += part

            for_blocks(add_dw, vocab, slice_rows)
        del z
    loss = np.asarray(nll[rows].sum() / np.asarray(len(rows), dtype), dtype) if len(rows) \
        else np.asarray(np.nan, dtype)
    gx = gw = gb = None
    if need_h:
        gx, gw, gb = normalize_rows_backward(dh, xhat, rstd, lnw if need["x"] else None,
                                             need["x"], need["w"], need["b"])
    return loss, (gx, gw, gb, dW) if any_grad else None

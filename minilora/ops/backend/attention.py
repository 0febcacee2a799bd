"""The fast attention: ``minilora.ops.attention``'s equations in blocks on the threads.

Causal attention runs in blocks of query rows that each stop at the last key they may see, each
block's scores, softmax and product together in cache. ``causal_self_attention`` reads the heads
straight from GPT's fused ``qkv`` projection and writes them merged, so the head split and merge
cost no copies and no graph nodes. Dropout on the attention weights runs the reference op.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from minilora.ops import attention as reference
from minilora.ops.attention import causal_mask, check_attention, check_qkv
from minilora.ops.backend import products
from minilora.ops.backend.blocks import for_each, rows_per_block
from minilora.ops.backend.products import swap
from minilora.tensor import Tensor


@functools.lru_cache(maxsize=16)
def _causal_bias(t_q: int, t_k: int, dtype: np.dtype) -> np.ndarray:
    # adding 0 / -inf is one fast broadcast pass; boolean-mask assignment is several times slower
    bias = np.where(causal_mask(t_q, t_k), -np.inf, 0.0).astype(dtype)
    bias.flags.writeable = False
    return bias


ROW_BLOCK = 64  # causal attention: query rows per block; each block skips the keys it cannot see


def attention_spans(t_q: int, t_k: int, causal: bool) -> list[tuple[int, int, int]]:
    """(r0, r1, k1): query rows r0:r1 attend keys 0:k1 (queries are the last t_q of t_k).

    Causal attention over 128 or more positions is cut into row blocks of ``ROW_BLOCK`` that
    each stop at the last key their rows may see: for T = 256 that skips 37.5% of the scores
    (and of the products) without changing a single result, since the skipped part is masked.
    Spans come in row order, so the last one sees every key.
    """
    if not causal or t_q < 2 * ROW_BLOCK:
        return [(0, t_q, t_k)]
    return [(r0, min(r0 + ROW_BLOCK, t_q), t_k - t_q + min(r0 + ROW_BLOCK, t_q))
            for r0 in range(0, t_q, ROW_BLOCK)]


def attention_forward(q, k, v, causal: bool, scale: float, out=None):
    """q: (n, ..., Tq, hd), k, v: (n, ..., Tk, hd) -> out (n, ..., Tq, hd) and P.

    P is a list with one array per span of ``attention_spans``: span (r0, r1, k1) holds
    softmax rows r0:r1 over keys 0:k1, shape (n, ..., r1 - r0, k1). Each is contiguous, so every
    softmax pass runs over long runs of memory, and the keys a causal span cannot see are not
    stored at all. Runs in blocks along the leading axes on the engine's threads: each block's
    scores, softmax and product stay together in cache. ``out`` may be a strided view.
    """
    if q.ndim == 2:  # one matrix: a batch of one
        o, p = attention_forward(q[None], k[None], v[None], causal, scale,
                                 None if out is None else out[None])
        return o[0], [part[0] for part in p]
    lead, (t_q, hd), t_k = q.shape[:-2], q.shape[-2:], k.shape[-2]
    spans = attention_spans(t_q, t_k, causal)
    p = [np.empty((*lead, r1 - r0, k1), dtype=q.dtype) for r0, r1, k1 in spans]
    out = np.empty((*lead, t_q, hd), dtype=q.dtype) if out is None else out
    bias = _causal_bias(t_q, t_k, q.dtype) if causal else None
    ones = np.ones(t_k, dtype=q.dtype)

    def block(i):
        qs = q[i] * scale  # scaling q costs Tq hd multiplies, scaling the scores Tq Tk
        for (r0, r1, k1), part in zip(spans, p, strict=True):
            s = part[i]
            products.matmul(qs[..., r0:r1, :], swap(k[i][..., :k1, :]), out=s)
            if bias is not None:  # only keys from r0 (shifted by Tk - Tq) on can be masked
                c0 = max(0, r0 + t_k - t_q)
                s[..., c0:] += bias[r0:r1, c0:k1]
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= (s @ ones[:k1])[..., None]  # row sums as a product: faster than sum(axis=-1)
            products.matmul(s, v[i][..., :k1, :], out=out[i][..., r0:r1, :])

    for_each(block, _blocks(lead, t_q * t_k))
    return out, p


def attention_backward(g, q, k, v, p, scale: float, need=(True, True, True), out=(None,) * 3,
                       causal: bool = False):
    """Gradients (dq, dk, dv) for upstream g: (n, ..., Tq, hd); ``need`` skips unwanted ones.

    ``p`` is what ``attention_forward`` returned with the same ``causal``. ``out`` may hold
    arrays (or strided views) to write dq, dk, dv into.
    """
    if q.ndim == 2:  # one matrix: a batch of one
        grads = attention_backward(g[None], q[None], k[None], v[None], [part[None] for part in p],
                                   scale, need, tuple(None if o is None else o[None] for o in out),
                                   causal)
        return tuple(None if d is None else d[0] for d in grads)
    dq, dk, dv = (None if not wanted else np.empty(like.shape, q.dtype) if o is None else o
                  for wanted, o, like in zip(need, out, (q, k, v), strict=True))
    lead, t_q, t_k = q.shape[:-2], q.shape[-2], k.shape[-2]
    spans = attention_spans(t_q, t_k, causal)

    def block(i):
        # dk and dv sum over the spans; add them up in contiguous memory, store once at the end
        acc_v = acc_k = None
        for j in reversed(range(len(spans))):  # the widest span (every key) first: it writes
            r0, r1, k1 = spans[j]
            pb, gb = p[j][i], g[i][..., r0:r1, :]
            if dv is not None:
                acc_v = _accumulate(acc_v, products.matmul(swap(pb), gb), k1)
            if dq is None and dk is None:
                continue
            ds = products.matmul(gb, swap(v[i][..., :k1, :]))  # dP
            ds -= np.einsum("...ij,...ij->...i", ds, pb)[..., None]  # row-wise dot, in one pass
            ds *= pb
            ds *= scale  # dS
            if dq is not None:
                products.matmul(ds, k[i][..., :k1, :], out=dq[i][..., r0:r1, :])
            if dk is not None:
                acc_k = _accumulate(acc_k, products.matmul(swap(ds), q[i][..., r0:r1, :]), k1)
        for target, acc in ((dv, acc_v), (dk, acc_k)):
            if target is not None:
                target[i][...] = acc

    for_each(block, _blocks(lead, t_q * t_k))
    return dq, dk, dv


def _accumulate(acc: np.ndarray | None, value: np.ndarray, k1: int) -> np.ndarray:
    """Add a span's gradient for keys 0:k1 into ``acc`` (the first, widest span becomes it)."""
    if acc is None:
        return value
    acc[..., :k1, :] += value
    return acc


def _blocks(lead: tuple[int, ...], per_matrix: int) -> list[tuple]:
    """Index tuples that cut the leading axes (B,) or (B, H) into blocks of about
    ``BLOCK_ELEMENTS`` score elements (and at least ``MIN_BLOCKS`` when that many matrices are
    large enough; see ``blocks.rows_per_block``), never across the first axis."""
    matrices = int(np.prod(lead))
    per = rows_per_block(matrices, per_matrix)  # matrices per block
    inner = int(np.prod(lead[1:]))
    if len(lead) == 1 or per >= inner:
        step = max(1, per // max(1, inner))
        return [(slice(b, b + step),) for b in range(0, lead[0], step)]
    h = lead[1]
    return [(b, slice(i, i + per)) for b in range(lead[0]) for i in range(0, h, per)]


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
                                 scale: float | None = None,
                                 dropout_mask: np.ndarray | None = None) -> Tensor:
    """softmax(q k^T * scale [+ causal mask]) v.   q: (..., Tq, hd), k, v: (..., Tk, hd).

    The same function as ``minilora.ops.attention.scaled_dot_product_attention``.
    """
    if dropout_mask is not None:
        return reference.scaled_dot_product_attention(q, k, v, causal, scale, dropout_mask)
    check_attention(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    qd, kd, vd = q.data, k.data, v.data
    out, p = attention_forward(qd, kd, vd, causal, scale)
    need = (q.requires_grad, k.requires_grad, v.requires_grad)

    def backward(g):
        return attention_backward(g, qd, kd, vd, p, scale, need, causal=causal)

    return Tensor.from_op(out, (q, k, v), backward)


def causal_self_attention(qkv: Tensor, n_head: int,
                          dropout_mask: np.ndarray | None = None) -> Tensor:
    """GPT's attention from the fused projection.   qkv: (B, T, 3C) -> (B, T, C).

    The same function as ``minilora.ops.attention.causal_self_attention``.
    """
    if dropout_mask is not None:
        return reference.causal_self_attention(qkv, n_head, dropout_mask)
    check_qkv(qkv, n_head)
    b, t, c3 = qkv.shape
    c = c3 // 3
    hd = c // n_head
    scale = 1.0 / math.sqrt(hd)
    heads = qkv.data.reshape(b, t, 3, n_head, hd).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
    q, k, v = heads[0], heads[1], heads[2]
    y = np.empty((b, t, c), dtype=qkv.dtype)
    _, p = attention_forward(q, k, v, True, scale, out=_heads(y, n_head))  # heads merged in place

    def backward(g):  # g: (B, T, C)
        dqkv = np.empty((b, t, 3, n_head, hd), dtype=g.dtype)
        dheads = dqkv.transpose(2, 0, 3, 1, 4)  # (3, B, H, T, hd) views into dqkv
        attention_backward(_heads(g, n_head), q, k, v, p, scale,
                           out=(dheads[0], dheads[1], dheads[2]), causal=True)
        return (dqkv.reshape(b, t, c3),)

    return Tensor.from_op(y, (qkv,), backward)


def _heads(x: np.ndarray, n_head: int) -> np.ndarray:
    """(B, T, C) -> a (B, H, T, C/H) view of the same memory."""
    b, t, c = x.shape
    return x.reshape(b, t, n_head, c // n_head).transpose(0, 2, 1, 3)

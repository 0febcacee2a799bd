"""A second, independent oracle: GPT-2's forward pass as plain NumPy functions.

No Tensor, no Module: each function is a few lines with the shape of every array, so it can be held
beside the equations in docs/ and beside nanoGPT. The Tensor model must match it.
"""

import math

import numpy as np


def gelu(x):  # GPT-2's tanh approximation
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


def softmax(x):  # along the last axis
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def layer_norm(x, w, b, eps=1e-5):  # x: (..., C)
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def linear(x, w, b):  # x: (..., in), w: (out, in), b: (out,)
    return x @ w.T + (0 if b is None else b)


def attention(x, p, n_head):  # x: (B, T, C); p: the weights of one attention module
    bsz, t, c = x.shape
    hd = c // n_head
    qkv = linear(x, p["c_attn.weight"], p.get("c_attn.bias"))  # (B, T, 3C)
    q, k, v = np.split(qkv, 3, axis=-1)  # each (B, T, C)
    # each (B, H, T, hd)
    q, k, v = (z.reshape(bsz, t, n_head, hd).transpose(0, 2, 1, 3) for z in (q, k, v))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)  # (B, H, T, T)
    scores = np.where(np.triu(np.ones((t, t), bool), 1), -np.inf, scores)  # no looking ahead
    y = softmax(scores) @ v  # (B, H, T, hd)
    y = y.transpose(0, 2, 1, 3).reshape(bsz, t, c)  # (B, T, C): heads side by side
    return linear(y, p["c_proj.weight"], p.get("c_proj.bias"))


def mlp(x, p):  # x: (B, T, C) -> (B, T, 4C) -> (B, T, C)
    h = gelu(linear(x, p["c_fc.weight"], p.get("c_fc.bias")))  # (B, T, 4C)
    return linear(h, p["c_proj.weight"], p.get("c_proj.bias"))


def sub(state, prefix):  # the entries of a state dict under "prefix.", with the prefix removed
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def gpt_logits(state, idx, n_layer, n_head):  # idx: (B, T) -> logits (B, T, V)
    wte = state["transformer.wte.weight"]  # (V, C), also the output projection (tied)
    t = idx.shape[1]
    x = wte[idx] + state["transformer.wpe.weight"][:t]  # (B, T, C)
    for i in range(n_layer):
        blk = sub(state, f"transformer.h.{i}")
        ln1, ln2 = sub(blk, "ln_1"), sub(blk, "ln_2")
        h = layer_norm(x, ln1["weight"], ln1.get("bias", 0))
        x = x + attention(h, sub(blk, "attn"), n_head)
        x = x + mlp(layer_norm(x, ln2["weight"], ln2.get("bias", 0)), sub(blk, "mlp"))
    lnf = sub(state, "transformer.ln_f")
    return layer_norm(x, lnf["weight"], lnf.get("bias", 0)) @ wte.T  # (B, T, V)


def cross_entropy(logits, targets):  # mean over all positions
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(logp, targets[..., None], axis=-1).mean()

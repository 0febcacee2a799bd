"""PiSSA and OLoRA: an adapter that starts on W's principal directions, and W replaced by the rest.

    W: (out, in)      A: (r, in)      B: (out, r)      s = lora_alpha / r

Both methods take A and B from a factorisation of W itself and replace the frozen weight by the
residual ``W_res = W - s B A``, so that at initialisation ``W_res + s B A = W``: the model's
outputs are unchanged, but training starts on the directions W uses most (docs/variants.md).

- PiSSA (Meng et al., 2024), PEFT's ``pissa_init``: W = V diag(S) U^T (``scipy.linalg.svd``),
  the r largest singular values S_r and their vectors V_r (out, r), U_r^T (r, in);
  ``A = diag(sqrt(S_r / s)) U_r^T``, ``B = V_r diag(sqrt(S_r / s))``, so
  ``s B A = V_r diag(S_r) U_r^T``, the best rank-r approximation of W.
- OLoRA (Büyükakyüz, 2024), PEFT's ``olora_init``: W = Q R (``scipy.linalg.qr``, reduced), the
  first r columns of Q and rows of R; ``A = R_r`` (r, in), ``B = Q_r`` (out, r). PEFT does not
  divide by s here, so s B A = s Q_r R_r.

Everything is computed in W's dtype (PEFT computes in float32 and refuses float64; minilora's
float64 models get float64). W is minilora's (out, in) weight, GPT-2's Conv1D included: minilora
stores every Linear as (out, in), where PEFT 0.21's OLoRA factors the Conv1D's stored (in, out)
array and builds A of shape (r, out) (docs/variants.md shows the failure).
"""

from __future__ import annotations

import re

import numpy as np
import scipy.linalg

from minilora.errors import ConfigError

RESIDUAL_INITS = ("pissa", "olora")  # the init_lora_weights values that replace W by W_res
PISSA_NITER = re.compile(r"pissa_niter_\d+")  # PEFT's randomized-SVD PiSSA, refused by name


def pissa_init(weight: np.ndarray, r: int, scaling: float) -> tuple[np.ndarray, np.ndarray]:
    """(A (r, in), B (out, r)) of PiSSA: W's top r singular triplets, sqrt(S / s) on each side."""
    V, S, Uh = scipy.linalg.svd(weight, full_matrices=False)  # W = V diag(S) Uh, PEFT's names
    root = np.sqrt(S[:r] / scaling)
    return root[:, None] * Uh[:r], V[:, :r] * root


def olora_init(weight: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(A (r, in), B (out, r)) of OLoRA: A = R_r, the first r rows of R, B = Q_r, W = Q R."""
    Q, R = scipy.linalg.qr(weight, mode="economic")
    return R[:r].copy(), Q[:, :r].copy()


def residual_init(method: str, weight: np.ndarray, r: int, scaling: float, owner: str = "LoRALinear"
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, B, W_res) for ``method`` ("pissa" or "olora") on W: (out, in), all in W's dtype;
    ``W_res = W - (s B) A``, as PEFT orders the product. r above min(in, out) is a ConfigError."""
    if r > min(weight.shape):
        raise ConfigError(f"{owner}: init_lora_weights={method!r} takes r={r} directions of W, "
                          f"which has only {min(weight.shape)} (shape {weight.shape}); use "
                          f"r <= {min(weight.shape)}")
    A, B = pissa_init(weight, r, scaling) if method == "pissa" else olora_init(weight, r)
    A, B = A.astype(weight.dtype, copy=False), B.astype(weight.dtype, copy=False)
    return A, B, weight - (scaling * B) @ A


def refuse_pissa_niter(where: str, value: str) -> None:
    """PEFT's ``"pissa_niter_K"`` runs ``torch.svd_lowrank`` (a randomized SVD, K power
    iterations); scipy has no randomized SVD with that meaning of K, and its random draws are
    torch's, so minilora refuses it by name rather than compute other numbers."""
    raise ConfigError(f"{where}={value!r} (PEFT's randomized SVD, "
                      "torch.svd_lowrank with K power iterations) is not implemented: scipy has "
                      "no randomized SVD with PEFT's meaning of K; use 'pissa' (the exact SVD)")

"""A new adapter from weighted old ones, as PEFT's ``add_weighted_adapter``: linear, cat, svd.

On a layer holding adapters i = 1..n (weights w_i, scalings s_i, ΔW_i = s_i B_i A_i), the new
adapter has scaling 1 (r = lora_alpha = its rank, as PEFT makes it) and:

- ``cat``: A = [w_1 s_1 A_1; ...; w_n s_n A_n], B = [B_1 ... B_n], so ΔW = Σ_i w_i ΔW_i exactly,
  at rank Σ r_i (zero rows and columns pad a layer's rank up to the config's).
- ``svd``: M = Σ_i w_i ΔW_i = U S V^T (``scipy.linalg.svd``), B = U_k S_k, A = V_k^T: the best
  rank-k approximation of M (Eckart-Young), exact when k >= rank(M); k is ``svd_rank`` or the
  largest rank combined.
- ``linear`` (equal ranks): c_i = sqrt|w_i s_i|, A = Σ_i sign(w_i s_i) c_i A_i, B = Σ_i c_i B_i.
  Then B A = Σ_i w_i ΔW_i + Σ_{i != j} c_i sign(w_j s_j) c_j B_i A_j: the weighted sum plus cross
  terms. It is exact only for one adapter, or when every B_i A_j (i != j) is 0.

An adapter on slices of a fused output enters as its full form (``SlicedAdapter.full_form``: rank
k r, B zero outside its slices). docs/adapters.md derives each and says where PEFT differs.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import scipy.linalg

from minilora.errors import ConfigError
from minilora.lora.config import ALL_LINEAR, LoRAConfig
from minilora.lora.model import _adapter_name, _adapter_names, _configs, active_adapters
from minilora.lora.plan import matching, named_lora_layers
from minilora.nn import Module

COMBINATION_TYPES = ("linear", "cat", "svd")


def add_weighted_adapter(model: Module, adapters: list[str], weights: list[float],
                         adapter_name: str, combination_type: str = "svd",
                         svd_rank: int | None = None, svd_clamp: float | None = None) -> Module:
    """Add ``adapter_name``, the combination of ``adapters`` with ``weights`` (see the module
    docstring), on every layer that holds one of them; inactive and frozen, as PEFT adds it.
    One adapter is always combined ``linear``ly (PEFT's rule). svd_clamp: clip B and A to the
    quantile ``svd_clamp`` of their entries' values (PEFT's ``svd_clamp``)."""
    names = _adapter_names(model, adapters, "add_weighted_adapter")
    name = _adapter_name(adapter_name, "add_weighted_adapter")
    configs = _configs(model)
    if name in configs:
        raise ConfigError(f"add_weighted_adapter: the model already has an adapter named {name!r}")
    kind = _check_arguments(names, weights, combination_type, svd_rank, svd_clamp)
    dora = [n for n in names if configs[n].use_dora]
    if dora:  # a combination of A and B alone would drop each magnitude m
        raise ConfigError(f"add_weighted_adapter: {dora} are DoRA adapters (use_dora=True); "
                          "combining them is not implemented")
    ranks = [_config_rank(configs[n]) for n in names]
    if kind == "linear" and len(set(ranks)) > 1:
        raise ConfigError(f"add_weighted_adapter: 'linear' needs adapters of one rank, got "
                          f"{dict(zip(names, ranks, strict=True))}")
    rank = {"linear": ranks[0], "cat": sum(ranks), "svd": svd_rank or max(ranks)}[kind]
    layers = [(n, layer) for n, layer in named_lora_layers(model)
              if any(a in layer.adapters for a in names)]
    arrays = {n: _combined(layer, names, [float(w) for w in weights], kind, rank, svd_clamp, n)
              for n, layer in layers}  # every array first: an error changes nothing
    first = configs[names[0]]
    config = dataclasses.replace(
        first, r=rank, lora_alpha=rank, rank_pattern=None, alpha_pattern=None, use_rslora=False,
        target_slices=None, bias="none", modules_to_save=None,
        target_modules=_union_of_targets(model, [configs[n] for n in names],
                                         [n for n, _ in layers]))
    active = active_adapters(model)
    for layer_name, layer in layers:
        adapter = layer.make_adapter(rank, rank, first.lora_dropout, False,
                                     first.init_lora_weights)
        layer.add_adapter(name, adapter, rng=np.random.default_rng(0))  # values replaced below
        for p, value in zip(layer.adapter_parameters(name), arrays[layer_name], strict=True):
            p.data = value.astype(layer.weight.dtype)
        layer.set_adapter(active)
    model.peft_config = {**configs, name: config}
    return model


def _check_arguments(names, weights, combination_type, svd_rank, svd_clamp) -> str:
    what = "add_weighted_adapter"
    if not isinstance(weights, (list, tuple)) or len(weights) != len(names) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
            for w in weights):
        raise ConfigError(f"{what}: weights must be {len(names)} finite numbers, one per adapter, "
                          f"got {weights!r}")
    if combination_type not in COMBINATION_TYPES:
        raise ConfigError(f"{what}: combination_type must be one of {list(COMBINATION_TYPES)} "
                          f"(PEFT's ties, dare and magnitude_prune are not implemented), got "
                          f"{combination_type!r}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool)
                                 or svd_rank < 1):
        raise ConfigError(f"{what}: svd_rank must be a positive integer or None, got "
                          f"{svd_rank!r}")
    if svd_clamp is not None and not (isinstance(svd_clamp, (int, float)) and 0 < svd_clamp <= 1):
        raise ConfigError(f"{what}: svd_clamp must be a quantile in (0, 1] or None, got "
                          f"{svd_clamp!r}")
    return "linear" if len(names) == 1 else combination_type


def _config_rank(config: LoRAConfig) -> int:
    """The largest rank an adapter's config gives a layer, as PEFT counts it (max of r and the
    rank_pattern), times the most slices it adapts in one module (its full form's rank)."""
    slices = max((len(v) for v in (config.target_slices or {}).values()), default=1)
    return max([config.r, *(config.rank_pattern or {}).values()]) * slices


def _combined(layer, names, weights, kind, rank, clamp, layer_name) -> tuple[np.ndarray, ...]:
    """(A, B) of the combination on one layer, in float64, padded with zeros to ``rank``."""
    parts = []
    for name, w in zip(names, weights, strict=True):
        if name in layer.adapters:
            adapter = layer.adapters[name]
            A, B = (p.data.astype(np.float64) for p in layer.adapter_parameters(name))
            A, B = adapter.full_form(A, B, layer.out_features)
            parts.append((w * adapter.scaling, A, B))
    if kind == "cat":
        A = np.concatenate([ws * A for ws, A, _ in parts], axis=0)
        B = np.concatenate([B for _, _, B in parts], axis=1)
    elif kind == "linear":
        if any(A.shape[0] != rank for _, A, _ in parts):
            raise ConfigError(f"add_weighted_adapter: 'linear' needs rank {rank} at every layer; "
                              f"{layer_name!r} holds ranks {[A.shape[0] for _, A, _ in parts]}")
        A = sum(math.copysign(math.sqrt(abs(ws)), ws) * A for ws, A, _ in parts)
        B = sum(math.sqrt(abs(ws)) * B for ws, _, B in parts)
    else:
        A, B = _truncated_svd(sum(ws * (B @ A) for ws, A, B in parts), rank, clamp)
    pad = rank - A.shape[0]
    return np.pad(A, ((0, pad), (0, 0))), np.pad(B, ((0, 0), (0, pad)))


def _truncated_svd(M: np.ndarray, rank: int, clamp: float | None) -> tuple[np.ndarray, ...]:
    """M (out, in) ~ B A with B = U_k S_k (out, k), A = V_k^T (k, in), k = min(rank, min(M.shape));
    ``clamp``: B and A clipped to [-q, q], q the ``clamp`` quantile of their entries."""
    U, S, Vt = scipy.linalg.svd(M, full_matrices=False)
    k = min(rank, len(S))
    B, A = U[:, :k] * S[:k], Vt[:k]
    if clamp is not None:
        q = np.quantile(np.concatenate([B.ravel(), A.ravel()]), clamp)
        B, A = np.clip(B, -q, q), np.clip(A, -q, q)
    return A, B


def _union_of_targets(model: Module, configs: list[LoRAConfig], layers: list[str]):
    """The new adapter's target_modules, PEFT's way where it names the same layers: the lists
    joined, or the regular expressions as one alternation; else the layers' full names."""
    targets = [c.target_modules for c in configs]
    if all(isinstance(t, tuple) for t in targets):
        union = tuple(dict.fromkeys(e for t in targets for e in t))
    elif all(isinstance(t, str) and t != ALL_LINEAR for t in targets):
        union = "|".join(f"({t})" for t in targets)
    else:
        return tuple(layers)
    names = [n for n, _ in model.named_modules() if n]
    regex = isinstance(union, str)
    hits = sorted({n for t in ([union] if regex else union) for n in matching(names, t, regex)},
                  key=names.index)
    return union if hits == layers else tuple(layers)

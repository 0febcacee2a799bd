"""Optimizers (SGD, AdamW), the cosine learning-rate schedule, and gradient clipping.

Both optimizers follow ``torch.optim`` line by line (same update order, same defaults), so a reader
can hold them beside PyTorch and a run can be checked against it to round-off. Rules that matter for
LoRA and for checkpoints:

- An optimizer takes Parameters, ``(name, Parameter)`` pairs (``model.named_parameters()``), or a
  list of parameter groups ``{"params": [...], "lr": ..., "weight_decay": ...}``.
- A parameter that does not require grad is skipped entirely: never updated, never decayed, and it
  gets no state. A parameter whose ``grad`` is None is skipped for that step.
- Updates are in place, in the parameter's dtype (hyper-parameters are Python floats, which keep
  float32 arrays float32).
- ``state_dict()`` is ``{"meta": JSON-able dict, "arrays": {str: ndarray}}`` keyed by parameter name
  (indices ``"0"``, ``"1"``, ... when no names were given); no pickle needed to save it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from minilora.errors import ConfigError, ShapeError, StateDictError
from minilora.ops.backend.blocks import for_blocks, rows_per_block
from minilora.tensor import Tensor

STATE_FORMAT = "minilora.optim/1"


def _number(owner: str, field: str, value, low: float = 0.0, high: float = math.inf,
            high_open: bool = False) -> float:
    """``value`` as a Python float in [low, high] (or [low, high)), else a ConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{owner}: {field} must be a number, got {value!r}")
    value = float(value)  # a Python float: an np.float64 here would promote float32 arrays
    inside = low <= value and (value < high if high_open else value <= high)
    if not (math.isfinite(value) and inside):
        upper = f"{high})" if high_open else f"{high}]"
        raise ConfigError(f"{owner}: {field} must be in [{low}, {upper}, got {value!r}")
    return value


def _pairs(items, owner: str) -> list[tuple[str | None, Tensor]]:
    """Parameters or (name, Parameter) pairs -> [(name or None, tensor)]."""
    out = []
    for item in items:
        if isinstance(item, Tensor):
            out.append((None, item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) \
                and isinstance(item[1], Tensor):
            out.append(item)
        else:
            raise ConfigError(f"{owner}: params must be Parameters or (name, Parameter) pairs, "
                              f"got {type(item).__name__}")
    return out


class Optimizer:
    """Parameter groups, per-parameter state keyed by name, and the state-dict format.

    Subclasses set ``defaults`` (the group hyper-parameters), ``slots`` (names of per-parameter
    state arrays), and implement ``_check_group`` and ``_update``.
    """

    slots: tuple[str, ...] = ()
    nonnegative: tuple[str, ...] = ()  # slots that can never hold a negative number

    def __init__(self, params, defaults: dict):
        owner = type(self).__name__
        items = list(params) if not isinstance(params, (Tensor, dict)) else [params]
        if items and all(isinstance(g, dict) for g in items):
            raw_groups = items
        elif any(isinstance(g, dict) for g in items):
            raise ConfigError(f"{owner}: params mixes parameter groups (dicts) with parameters")
        else:
            raw_groups = [{"params": items}]
        self.defaults = dict(defaults)
        self.param_groups: list[dict] = []
        self.state: dict[str, dict] = {}  # name -> {"step": int, slot: ndarray, ...}
        pairs_all, seen_ids = [], set()
        for i, raw in enumerate(raw_groups):
            unknown = set(raw) - set(defaults) - {"params"}
            if "params" not in raw or unknown:
                raise ConfigError(f"{owner}: parameter group {i} needs 'params' and may set "
                                  f"{sorted(defaults)}, got keys {sorted(raw)}")
            ps = raw["params"]
            pairs = _pairs([ps] if isinstance(ps, Tensor) else ps, owner)
            for _, p in pairs:
                if id(p) in seen_ids:
                    raise ConfigError(f"{owner}: a parameter appears in more than one place")
                if not np.issubdtype(p.dtype, np.floating):
                    raise ConfigError(f"{owner}: parameters must be floating point, got {p.dtype}")
                seen_ids.add(id(p))
            group = {**self.defaults, **{k: v for k, v in raw.items() if k != "params"}}
            self._check_group(group, f"{owner} group {i}")
            group["params"] = [p for _, p in pairs]
            pairs_all.append(pairs)
            self.param_groups.append(group)
        base_lr = self.defaults.get("lr")  # each group's rate as a multiple of it, for set_lr
        self.lr_ratios = [g["lr"] / base_lr if base_lr else (1.0 if not g["lr"] else None)
                          for g in self.param_groups]
        flat = [name for pairs in pairs_all for name, _ in pairs]
        if not flat:
            raise ConfigError(f"{owner}: got no parameters to optimize")
        if all(n is None for n in flat):
            counter = iter(range(len(flat)))
            for group, pairs in zip(self.param_groups, pairs_all, strict=True):
                group["names"] = [str(next(counter)) for _ in pairs]
        elif any(n is None for n in flat):
            raise ConfigError(f"{owner}: give every parameter a name or none of them")
        else:
            if len(set(flat)) != len(flat):
                dup = next(n for n in flat if flat.count(n) > 1)
                raise ConfigError(f"{owner}: parameter name {dup!r} appears twice")
            for group, pairs in zip(self.param_groups, pairs_all, strict=True):
                group["names"] = [n for n, _ in pairs]

    # ---- to be provided by subclasses -----------------------------------------------------
    def _check_group(self, group: dict, owner: str) -> None:
        raise NotImplementedError

    def _update(self, p: Tensor, g: np.ndarray, state: dict, group: dict) -> None:
        raise NotImplementedError

    # ---- stepping ---------------------------------------------------------------------------
    def step(self) -> None:
        """One update of every parameter that requires grad and has a ``grad``."""
        for group in self.param_groups:
            for name, p in zip(group["names"], group["params"], strict=True):
                if not p.requires_grad or p.grad is None:
                    continue  # frozen: no update, no decay, no state
                g = p.grad
                if g.shape != p.shape:
                    raise ShapeError(f"{type(self).__name__}: grad of {name!r} has shape "
                                     f"{g.shape}, the parameter {p.shape}")
                if g.dtype != p.dtype:
                    g = g.astype(p.dtype)
                if not p.data.flags.writeable:
                    p.data = p.data.copy()
                state = self.state.setdefault(name, {"step": 0})
                state["step"] += 1
                self._update(p, g, state, group)

    def zero_grad(self) -> None:
        """Set every parameter's ``grad`` to None (nothing allocated, as PyTorch's default)."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def set_lr(self, lr: float) -> None:
        """Set the learning rate to ``lr`` (what a schedule does each iteration): each group's to
        ``lr`` times its rate's ratio to the optimizer's ``lr`` when made, as torch's schedulers
        scale each group's initial rate; so LoRA+'s B group stays ``loraplus_lr_ratio`` ahead."""
        lr = _number(type(self).__name__, "lr", lr)
        if None in self.lr_ratios:
            raise ConfigError(f"{type(self).__name__}.set_lr: group "
                              f"{self.lr_ratios.index(None)} has its own lr, which is no multiple "
                              "of the optimizer's lr 0")
        for group, ratio in zip(self.param_groups, self.lr_ratios, strict=True):
            group["lr"] = lr * ratio

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"meta": dict of JSON-able values, "arrays": {"<name>.<slot>": ndarray copy}}``.

        meta holds the format tag, the optimizer type, each group's hyper-parameters and parameter
        names, and each parameter's step count. Save ``arrays`` as safetensors/npz and ``meta`` as
        JSON; [`load_state_dict`][] then continues bit for bit.
        """
        groups = []
        for group in self.param_groups:
            hyper = {k: (list(v) if isinstance(v, tuple) else v)
                     for k, v in group.items() if k in self.defaults}
            groups.append({**hyper, "params": list(group["names"])})
        meta = {"format": STATE_FORMAT, "type": type(self).__name__, "param_groups": groups,
                "state": {name: {"step": int(s["step"])} for name, s in self.state.items()}}
        arrays = {f"{name}.{slot}": s[slot].copy()
                  for name, s in self.state.items() for slot in self.slots if slot in s}
        return {"meta": meta, "arrays": arrays}

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore what [`state_dict`][] returned (possibly via JSON and a tensor file).

        Everything is checked before anything changes: the type, the groups and their parameter
        names, the step counts, and every array's name, shape, dtype and finiteness. A mismatch is a
        StateDictError naming the entry.
        """
        owner = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("meta"), Mapping) \
                or not isinstance(state_dict.get("arrays"), Mapping):
            raise StateDictError(f"{owner}: expected a mapping with 'meta' and 'arrays'")
        meta, arrays = state_dict["meta"], state_dict["arrays"]
        if meta.get("format") != STATE_FORMAT or meta.get("type") != type(self).__name__:
            raise StateDictError(f"{owner}: expected format {STATE_FORMAT!r} of type "
                                 f"{type(self).__name__!r}, got {meta.get('format')!r} of type "
                                 f"{meta.get('type')!r}")
        groups = meta.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            got = len(groups) if isinstance(groups, list) else type(groups).__name__
            raise StateDictError(f"{owner}: expected {len(self.param_groups)} parameter groups, "
                                 f"got {got}")
        new_groups = []
        for i, (saved, group) in enumerate(zip(groups, self.param_groups, strict=True)):
            if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), list) \
                    or set(map(str, saved["params"])) != set(group["names"]):
                names = group["names"]
                raise StateDictError(f"{owner}: group {i} does not hold the parameters "
                                     f"{names[:4]}{'...' if len(names) > 4 else ''}")
            hyper = {k: (tuple(v) if isinstance(v, list) else v)
                     for k, v in saved.items() if k in self.defaults}
            if set(hyper) != set(self.defaults):
                raise StateDictError(f"{owner}: group {i} needs {sorted(self.defaults)}, "
                                     f"got {sorted(hyper)}")
            try:
                self._check_group(hyper, f"{owner}: group {i}")
            except ConfigError as e:
                raise StateDictError(str(e)) from None
            new_groups.append(hyper)
        params = {n: (p, hyper) for group, hyper in zip(self.param_groups, new_groups, strict=True)
                  for n, p in zip(group["names"], group["params"], strict=True)}
        saved_state = meta.get("state")
        if not isinstance(saved_state, Mapping):
            raise StateDictError(f"{owner}: 'state' must be a mapping of parameter names")
        new_state: dict[str, dict] = {}
        for name, s in saved_state.items():
            if name not in params:
                raise StateDictError(f"{owner}: state for unknown parameter {name!r}")
            if not params[name][0].requires_grad:
                raise StateDictError(f"{owner}: state for {name!r}, which does not require grad")
            step = s.get("step") if isinstance(s, Mapping) else None
            if isinstance(step, bool) or not isinstance(step, int) or step < 1:
                raise StateDictError(f"{owner}: step of {name!r} must be a positive integer, "
                                     f"got {step!r}")
            new_state[name] = {"step": step}
        for key, value in arrays.items():
            name, _, slot = str(key).rpartition(".")
            if name not in new_state or slot not in self.slots:
                raise StateDictError(f"{owner}: unexpected array {key!r}")
            p = params[name][0]
            ok = isinstance(value, np.ndarray) and (value.shape, value.dtype) == (p.shape, p.dtype)
            if not ok:
                got = (value.shape, str(value.dtype)) if isinstance(value, np.ndarray) \
                    else type(value).__name__
                raise StateDictError(f"{owner}: array {key!r} must be {p.shape} {p.dtype}, "
                                     f"got {got}")
            if not np.isfinite(value).all() or (slot in self.nonnegative and (value < 0).any()):
                raise StateDictError(f"{owner}: array {key!r} holds non-finite or invalid values")
            new_state[name][slot] = np.array(value, copy=True, order="C")
        for name, s in new_state.items():
            missing = [slot for slot in self._required_slots(params[name][1]) if slot not in s]
            if missing:
                raise StateDictError(f"{owner}: parameter {name!r} lacks state arrays {missing}")
        # everything is checked: now change the optimizer
        for group, hyper in zip(self.param_groups, new_groups, strict=True):
            group.update(hyper)
        self.state = new_state

    def _required_slots(self, group: dict) -> tuple[str, ...]:
        return self.slots


class SGD(Optimizer):
    """Stochastic gradient descent with momentum and (L2, coupled) weight decay, as torch.optim.SGD.

        d = g + weight_decay * p
        buf = d (first step), else momentum * buf + d
        d = d + momentum * buf (nesterov), else buf
        p = p - lr * d
    """

    slots = ("momentum_buffer",)

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "nesterov": nesterov})

    def _check_group(self, group: dict, owner: str) -> None:
        group["lr"] = _number(owner, "lr", group["lr"])
        group["momentum"] = _number(owner, "momentum", group["momentum"], 0.0, 1.0, high_open=True)
        group["weight_decay"] = _number(owner, "weight_decay", group["weight_decay"])
        if not isinstance(group["nesterov"], bool):
            raise ConfigError(f"{owner}: nesterov must be True or False, got {group['nesterov']!r}")
        if group["nesterov"] and group["momentum"] == 0.0:
            raise ConfigError(f"{owner}: nesterov needs momentum > 0")

    def _required_slots(self, group: dict) -> tuple[str, ...]:
        return self.slots if group["momentum"] != 0.0 else ()

    def _update(self, p: Tensor, g: np.ndarray, state: dict, group: dict) -> None:
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        momentum = float(group["momentum"])
        d = g + wd * p.data if wd != 0.0 else g
        if momentum != 0.0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = np.array(d, copy=True)
            else:
                buf *= momentum
                buf += d
            d = d + momentum * buf if group["nesterov"] else buf
        p.data += -lr * d


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), in torch.optim.AdamW's order.

    For step t (per parameter), gradient g:
        p  = p * (1 - lr * weight_decay)
        m  = m + (1 - beta1) * (g - m)                 (torch's lerp)
        v  = v * beta2 + (1 - beta2) * g * g
        p  = p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """

    slots = ("exp_avg", "exp_avg_sq")
    nonnegative = ("exp_avg_sq",)

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})

    def _check_group(self, group: dict, owner: str) -> None:
        group["lr"] = _number(owner, "lr", group["lr"])
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ConfigError(f"{owner}: betas must be a pair of numbers, got {betas!r}")
        group["betas"] = tuple(_number(owner, f"betas[{i}]", b, 0.0, 1.0, high_open=True)
                               for i, b in enumerate(betas))
        group["eps"] = _number(owner, "eps", group["eps"])
        group["weight_decay"] = _number(owner, "weight_decay", group["weight_decay"])

    def _update(self, p: Tensor, g: np.ndarray, state: dict, group: dict) -> None:
        lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
        beta1, beta2 = (float(b) for b in group["betas"])
        if not p.data.flags.c_contiguous:  # the flat views below must be views, not copies
            p.data = np.ascontiguousarray(p.data)
        if "exp_avg" not in state:
            state["exp_avg"] = np.zeros(p.shape, p.dtype)
            state["exp_avg_sq"] = np.zeros(p.shape, p.dtype)
        m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        step_size = lr / (1.0 - beta1**t)
        correction = (1.0 - beta2**t) ** 0.5
        flat = [a.reshape(-1) for a in (p.data, g, m, v)]  # views: the update is in place

        def update(lo, hi):  # elementwise, so blocks on any threads give the same bits
            pb, gb, mb, vb = (a[lo:hi] for a in flat)
            t, denom = np.empty((2, hi - lo), p.dtype)  # two temporaries, reused in place
            if wd != 0.0:
                pb *= 1.0 - lr * wd
            np.subtract(gb, mb, out=t)
            t *= 1.0 - beta1
            mb += t
            vb *= beta2
            np.multiply(gb, 1.0 - beta2, out=t)  # rounded as (1 - beta2) * g * g: this order
            t *= gb
            vb += t
            np.sqrt(vb, out=denom)
            denom /= correction
            denom += eps
            np.multiply(mb, -step_size, out=t)
            t /= denom
            pb += t

        for_blocks(update, p.size, rows_per_block(p.size, 1))


def param_groups(named_parameters: Iterable[tuple[str, Tensor]], weight_decay: float) -> list[dict]:
    """nanoGPT's rule: decay every trainable parameter with >= 2 dimensions (matmul weights,
    embeddings, LoRA's A and B); never biases, LayerNorm weights or anything 1-D.

    Returns up to two groups of (name, parameter) pairs, ``[{"params", "weight_decay"}, ...]``,
    leaving out parameters that do not require grad and groups that would be empty.
    """
    weight_decay = _number("param_groups", "weight_decay", weight_decay)
    trainable = [(n, p) for n, p in named_parameters if p.requires_grad]
    decay = [(n, p) for n, p in trainable if p.ndim >= 2]
    no_decay = [(n, p) for n, p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def cosine_lr(it: int, lr: float, min_lr: float, warmup_iters: int, lr_decay_iters: int) -> float:
    """nanoGPT's ``get_lr``: linear warm-up, then cosine decay from ``lr`` to ``min_lr``.

        it < warmup_iters:        lr * (it + 1) / (warmup_iters + 1)
        it > lr_decay_iters:      min_lr
        otherwise:                min_lr + 0.5 (1 + cos(pi r)) (lr - min_lr),
                                  r = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    """
    owner = "cosine_lr"
    lr = _number(owner, "lr", lr)
    min_lr = _number(owner, "min_lr", min_lr, 0.0, lr)
    counts = (("it", it), ("warmup_iters", warmup_iters), ("lr_decay_iters", lr_decay_iters))
    for field, value in counts:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ConfigError(f"{owner}: {field} must be a non-negative integer, got {value!r}")
    if lr_decay_iters < warmup_iters:
        raise ConfigError(f"{owner}: lr_decay_iters ({lr_decay_iters}) must be >= warmup_iters "
                          f"({warmup_iters})")
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:  # at it == lr_decay_iters the cosine is min_lr too; no 0/0 either
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


@dataclass(frozen=True)
class CosineSchedule:
    """``schedule(it)`` is [`cosine_lr`][] with these settings; checked when made."""

    lr: float
    min_lr: float
    warmup_iters: int
    lr_decay_iters: int

    def __post_init__(self) -> None:
        cosine_lr(0, self.lr, self.min_lr, self.warmup_iters, self.lr_decay_iters)

    def __call__(self, it: int) -> float:
        return cosine_lr(it, self.lr, self.min_lr, self.warmup_iters, self.lr_decay_iters)


def grad_norm(params: Iterable[Tensor]) -> float:
    """The global L2 norm of the parameters' gradients, summed in float64 (None counts as 0)."""
    return _norm([p.grad for p in params if p.grad is not None])


def _norm(grads: list[np.ndarray]) -> float:
    total = 0.0
    for g in grads:
        flat = g.reshape(-1).astype(np.float64)
        total += float(flat @ flat)
    return math.sqrt(total)


def clip_grad_norm(params: Iterable[Tensor], max_norm: float) -> float:
    """Scale all gradients in place so their global L2 norm is at most ``max_norm``.

    Returns the norm before clipping, summed in float64 (the gradients keep their dtype). As
    PyTorch, the factor is ``max_norm / (norm + 1e-6)``, applied only when it is below 1. A
    non-finite norm is returned without touching any gradient, so the caller can report it.
    """
    max_norm = _number("clip_grad_norm", "max_norm", max_norm)
    if max_norm == 0.0:
        raise ConfigError("clip_grad_norm: max_norm must be > 0, got 0.0")
    grads = [p.grad for p in params if p.grad is not None]
    norm = _norm(grads)
    if math.isfinite(norm):
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for g in grads:
                g *= coef
    return norm

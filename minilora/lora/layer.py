"""LoRA layers: a frozen base layer plus low-rank paths, the adapters, held by name.

    W: (out, in) frozen      A: (r, in) trainable      B: (out, r) trainable, starts at 0

A layer holds its adapters by name, as PEFT's ``LoraLayer`` does, ``"default"`` first; each is one
of the kinds of ``lora/adapters.py``. Their arrays are the layer's Parameters, named by
[`parameter_name`][]: ``lora_A`` and ``lora_B`` for the default adapter, so that ``layer.lora_A``,
state dicts and checkpoints read as they do with one adapter, and ``lora_A.<adapter>`` for another
(PEFT's own name inside a model is ``lora_A.<adapter>.weight``). The layer keeps the base layer's
parameter names (``weight``, ``bias``), so a base model's state dict loads into an adapted one.

The forward pass is the base output plus the path of every active adapter that is not merged.
With one, that is the adapter's own op (for a Linear, the fused ``ops.lora_linear``, which never
forms ``B A`` nor computes ``dW``); with several, the base op and each path, added. Merging folds
an adapter's ΔW into W and keeps the array it replaced; unmerging puts them back in reverse
order, so W comes back bit for bit.
"""

from __future__ import annotations

import warnings

import numpy as np

from minilora import ops
from minilora.errors import ConfigError, TargetModuleError
from minilora.lora.adapters import (
    DoraAdapter,
    EmbeddingAdapter,
    LinearAdapter,
    SlicedAdapter,
    init_lora_A,
)
from minilora.nn import Embedding, Linear, Module, Parameter, make_rng
from minilora.nn.layers import check_indices
from minilora.tensor import Tensor, as_tensor

DEFAULT = "default"  # PEFT's name for the first adapter

__all__ = ["DEFAULT", "LoRAEmbedding", "LoRALayer", "LoRALinear", "init_lora_A", "parameter_name"]


def parameter_name(kind: str, adapter_name: str) -> str:
    """The layer's name for an adapter's parameter: ``lora_A`` for the default adapter,
    ``lora_A.<adapter_name>`` for another."""
    return kind if adapter_name == DEFAULT else f"{kind}.{adapter_name}"


def _default_setting(name: str) -> property:
    def get(self):
        return getattr(self._default_adapter(), name)

    get.__doc__ = f"The default adapter's ``{name}`` (``layer.adapters[name].{name}`` for another)."
    return property(get)


class LoRALayer(Module):
    """What every LoRA layer shares: its adapters by name, which are active, merging, switching
    the adapters off. A subclass takes over its base layer's parameters (frozen) and says what
    the base computes (``base_forward``)."""

    def _start(self, base_weight: Parameter, base_bias: Parameter | None, rng) -> None:
        self.weight = _frozen(base_weight)
        self.bias = None if base_bias is None else _frozen(base_bias)
        self.rng = make_rng(rng)
        self.adapters: dict = {}  # adapter name -> its kind and settings (lora/adapters.py)
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._replaced: list[np.ndarray] = []  # the W each merge replaced, in merge order
        self._disabled = False

    # ---- adapters by name --------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, adapter, active: bool = False,
                    rng: np.random.Generator | None = None) -> None:
        """Add ``adapter`` under ``adapter_name``, its parameters drawn from ``rng`` (default:
        ``self.rng``) in order, in the base's dtype; trainable and active only with ``active``.
        PiSSA and OLoRA take them from W instead and replace W by the residual W - s B A."""
        if adapter_name in self.adapters:
            raise ConfigError(f"{type(self).__name__}: it already holds an adapter named "
                              f"{adapter_name!r}")
        if self.merged:
            raise ConfigError(f"{type(self).__name__}: adapters {self.merged_adapters} are "
                              "merged; unmerge() before adding one")
        residual = adapter.residual(self.weight.data)  # PiSSA, OLoRA: (A, B, W_res)
        values = residual[:2] if residual is not None else adapter.initial(
            self.in_features, self.out_features, self.rng if rng is None else rng,
            base=self.weight.data)
        for kind, value in zip(adapter.PARAMETERS, values, strict=True):
            p = Parameter(value.astype(self.weight.dtype), requires_grad=active)
            self._parameters[parameter_name(kind, adapter_name)] = p
            if adapter_name == DEFAULT:
                object.__setattr__(self, kind, p)
        self.adapters[adapter_name] = adapter
        if residual is not None:  # W_res + s B A = W: the layer's output is unchanged
            self.weight.data = residual[2]
        if active:
            self.active_adapters.append(adapter_name)

    def adapter_parameters(self, adapter_name: str) -> tuple[Parameter, ...]:
        """The Parameters of one adapter, in its kind's order (``lora_A``, ``lora_B``)."""
        kinds = self.adapters[adapter_name].PARAMETERS
        return tuple(self._parameters[parameter_name(k, adapter_name)] for k in kinds)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter that is not merged; the others are left exactly as they were."""
        if adapter_name in self.merged_adapters:
            raise ConfigError(f"{type(self).__name__}: adapter {adapter_name!r} is merged; "
                              "unmerge() before deleting it")
        for kind in self.adapters.pop(adapter_name).PARAMETERS:
            del self._parameters[parameter_name(kind, adapter_name)]
            if adapter_name == DEFAULT:
                object.__delattr__(self, kind)
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    def set_adapter(self, adapter_names: list[str]) -> None:
        """Make ``adapter_names`` the active adapters (those this layer holds run), trainable,
        and freeze the others, as PEFT's ``set_adapter``."""
        self.active_adapters = list(adapter_names)
        for name in self.adapters:
            for p in self.adapter_parameters(name):
                p.requires_grad_(name in self.active_adapters)
                if name not in self.active_adapters:
                    p.grad = None

    def running_adapters(self) -> list[str]:
        """The adapters whose paths the forward pass adds: active, held here, not merged."""
        if self._disabled:
            return []
        return [n for n in self.active_adapters
                if n in self.adapters and n not in self.merged_adapters]

    def _default_adapter(self):
        if DEFAULT not in self.adapters:
            raise AttributeError(f"{type(self).__name__} has no {DEFAULT!r} adapter (it holds "
                                 f"{list(self.adapters)}); see layer.adapters")
        return self.adapters[DEFAULT]

    r = _default_setting("r")
    lora_alpha = _default_setting("lora_alpha")
    scaling = _default_setting("scaling")
    lora_dropout = _default_setting("lora_dropout")
    use_rslora = _default_setting("use_rslora")
    init_lora_weights = _default_setting("init_lora_weights")

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x) -> Tensor:
        """The base output plus each running adapter's path; with one, that adapter's own op."""
        x = self.checked_input(x)
        running = self.running_adapters()
        if len(running) == 1:
            name = running[0]
            return self.adapters[name].forward(self, x, *self.adapter_parameters(name))
        y = self.base_forward(x)
        for name in running:
            y = y + self.adapters[name].path(self, x, *self.adapter_parameters(name))
        return y

    def dropout_mask(self, x: Tensor, p: float) -> np.ndarray | None:
        """A mask for an adapter's input (0 or 1/(1-p)), from ``self.rng``; None in eval mode."""
        if not self.training or p == 0.0:
            return None
        return ops.dropout_mask(x.shape, p, self.rng, x.dtype)

    # ---- merging -------------------------------------------------------------------------------
    @property
    def base_weight(self) -> np.ndarray:
        """W before any merge: the weight itself, or the array the first merge replaced."""
        return self._replaced[0] if self._replaced else self.weight.data

    @property
    def merged(self) -> bool:
        """True while any adapter is merged into the weight."""
        return bool(self.merged_adapters)

    def delta_weight(self, adapter_name: str = DEFAULT) -> np.ndarray:
        """What the adapter adds to W, in W's shape and dtype (PEFT's ``get_delta_weight``)."""
        delta = np.zeros_like(self.weight.data)
        arrays = [p.data for p in self.adapter_parameters(adapter_name)]
        for rows, block in self.adapters[adapter_name].delta_blocks(*arrays,
                                                                   base=self.base_weight):
            delta[rows] += block
        return delta

    def merge(self, adapter_names: list[str] | None = None) -> None:
        """W <- W + ΔW for each adapter named (default: the active ones) that this layer holds
        and has not merged; the forward pass then skips their paths. Merging a merged adapter
        changes nothing and warns, as PEFT does; a disabled layer refuses."""
        if self._disabled:
            raise ConfigError(f"{type(self).__name__}.merge: the adapters are disabled; enable "
                              "them before merging")
        names = [n for n in (self.active_adapters if adapter_names is None else adapter_names)
                 if n in self.adapters]
        if names and all(n in self.merged_adapters for n in names):
            what = "the adapter is" if len(names) == 1 else f"the adapters {names} are"
            warnings.warn(f"{type(self).__name__}.merge: {what} already merged, nothing to do",
                          stacklevel=2)  # as PEFT does
        for name in [n for n in names if n not in self.merged_adapters]:
            arrays = [p.data for p in self.adapter_parameters(name)]
            merged = self.weight.data.copy()
            for rows, block in self.adapters[name].delta_blocks(*arrays, base=self.base_weight):
                merged[rows] += block  # only the rows the adapter writes change
            self._replaced.append(self.weight.data)
            self.weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo every merge, last first: W is the array it was before, bit for bit."""
        while self.merged_adapters:
            self.merged_adapters.pop()
            self.weight.data = self._replaced.pop().astype(self.weight.dtype, copy=False)

    # ---- switching the adapters off and on ------------------------------------------------------
    @property
    def disable_adapters(self) -> bool:
        """True while the adapters are switched off (the forward pass is the base layer's)."""
        return self._disabled

    def enable_adapters(self, enabled: bool) -> None:
        """Switch every adapter path on or off, as PEFT's ``LoraLayer.enable_adapters``. A merged
        layer cannot give its base output without unmerging, so that is an error."""
        if not enabled and self.merged:
            raise ConfigError(f"{type(self).__name__}.enable_adapters(False): the adapter is "
                              "merged into the weight; unmerge() before disabling it")
        self._disabled = not enabled

    def _adapters_repr(self) -> str:
        parts = [f"{n}: r={a.r}, lora_alpha={a.lora_alpha}, scaling={a.scaling:g}, "
                 f"lora_dropout={a.lora_dropout}" + (
            f", slices={'/'.join(a.names)}" if isinstance(a, SlicedAdapter) else "") + (
            ", use_dora=True" if isinstance(a, DoraAdapter) else "")
            for n, a in self.adapters.items()]
        return f"adapters={{{'; '.join(parts)}}}, active={self.active_adapters}, " \
               f"merged={self.merged_adapters}"


class LoRALinear(LoRALayer):
    """A Linear adapted by LoRA.   x: (..., in) -> (..., out).

    base: the Linear to adapt. Its ``weight`` (out, in) and ``bias`` (out,) Parameters are taken
        over, not copied, and frozen (``requires_grad=False``, ``grad=None``).
    r, lora_alpha, use_rslora: rank and scaling, ``scaling = lora_alpha / r`` (``/ sqrt(r)``).
    lora_dropout: dropout probability on the adapter's input only; masks come from ``rng``.
    init_lora_weights: "kaiming" or "gaussian" for ``lora_A`` (r, in), ``lora_B`` (out, r) 0; or
        "pissa" / "olora": both from W, and W replaced by the residual (``lora/residual_init.py``).
    rng: a ``numpy.random.Generator`` or a seed, for A's initial values and the dropout masks.
    adapter_name: the first adapter's name, active and trainable.
    slices: (lo, hi) row ranges of a fused output to adapt, each with its own rank-r adapter
        (``SlicedAdapter``); None adapts all of W. ``slice_names`` name them in messages.
    use_dora: DoRA (``DoraAdapter``): a magnitude ``lora_magnitude_vector`` (out,) beside A, B.
    """

    def __init__(self, base: Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: str = "kaiming",
                 rng: np.random.Generator | int | None = None, adapter_name: str = DEFAULT,
                 slices: tuple[tuple[int, int], ...] | None = None,
                 slice_names: tuple[str, ...] = (), use_dora: bool = False):
        super().__init__()
        if isinstance(base, LoRALinear):
            held = ", ".join(f"{n}: r={a.r}" for n, a in base.adapters.items())
            raise TargetModuleError(f"LoRALinear: the layer is already adapted ({held}); "
                                    "add_adapter to it, or unload it before adapting it again")
        if not isinstance(base, Linear):
            raise TargetModuleError(f"LoRALinear: base must be a Linear, got {type(base).__name__}")
        adapter = self.make_adapter(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                                    slices, slice_names, use_dora)
        self.in_features, self.out_features = base.in_features, base.out_features
        self._start(base.weight, base.bias, rng)
        self.add_adapter(adapter_name, adapter, active=True)

    @staticmethod
    def make_adapter(r, lora_alpha, lora_dropout=0.0, use_rslora=False,
                     init_lora_weights="kaiming", slices=None, slice_names=(),
                     use_dora=False) -> LinearAdapter:
        """The adapter kind for a Linear: a ``SlicedAdapter`` with ``slices``, a ``DoraAdapter``
        with ``use_dora``, else a full one."""
        settings = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        use_rslora=use_rslora, init_lora_weights=init_lora_weights)
        if use_dora and slices is not None:
            raise ConfigError("LoRALinear: DoRA on slices of a fused output is not implemented "
                              "(PEFT has no such adapter); adapt the whole layer")
        if use_dora:
            return DoraAdapter(**settings)
        if slices is None:
            return LinearAdapter(**settings)
        return SlicedAdapter(**settings, slices=tuple(slices), names=tuple(slice_names))

    def checked_input(self, x) -> Tensor:
        return as_tensor(x)

    def base_forward(self, x: Tensor) -> Tensor:
        return ops.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self._adapters_repr()}")


class LoRAEmbedding(LoRALayer):
    """An Embedding adapted by LoRA, as PEFT's ``lora.Embedding``.   idx: (...) -> (..., dim).

    base: the Embedding; its ``weight`` (vocab, dim) is taken over and frozen. Its adapter is
    ``lora_embedding_A`` (r, vocab) = 0 and ``lora_embedding_B`` (dim, r) ~ N(0, 1), PEFT's
    names and initialisation, so a fresh adapter changes nothing. ``in_features`` is the vocabulary
    and ``out_features`` the embedding width, as PEFT sets them. No dropout (PEFT applies none).
    """

    def __init__(self, base: Embedding, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: str = "kaiming",
                 rng: np.random.Generator | int | None = None, adapter_name: str = DEFAULT):
        super().__init__()
        if isinstance(base, LoRAEmbedding):
            raise TargetModuleError("LoRAEmbedding: the layer is already adapted; add_adapter to "
                                    "it, or unload it before adapting it again")
        if not isinstance(base, Embedding):
            raise TargetModuleError(f"LoRAEmbedding: base must be an Embedding, got "
                                    f"{type(base).__name__}")
        adapter = self.make_adapter(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.in_features, self.out_features = base.num_embeddings, base.embedding_dim
        self._start(base.weight, None, rng)
        self.add_adapter(adapter_name, adapter, active=True)

    @staticmethod
    def make_adapter(r, lora_alpha, lora_dropout=0.0, use_rslora=False,
                     init_lora_weights="kaiming") -> EmbeddingAdapter:
        """The adapter kind for an Embedding."""
        return EmbeddingAdapter(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)

    def checked_input(self, idx) -> np.ndarray:
        idx = np.asarray(idx.data if isinstance(idx, Tensor) else idx)
        check_indices(idx, self.num_embeddings, self.embedding_dim)
        return idx

    def base_forward(self, idx: np.ndarray) -> Tensor:
        return ops.getitem(self.weight, idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self._adapters_repr()}"


def _frozen(p: Parameter) -> Parameter:
    p.requires_grad_(False)
    p.grad = None  # a stale gradient on a frozen parameter would invite an optimizer to use it
    return p

"""Module and Parameter: a registry of named parameters and submodules, as in PyTorch.

Assigning a [`Parameter`][] or a [`Module`][] to an attribute registers it under that name;
``named_parameters()`` then yields dotted names (``transformer.h.0.attn.c_attn.weight``) in the
order they were assigned. A parameter shared by two modules (tied weights) is listed once, under the
first name that reaches it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import NamedTuple

import numpy as np

from minilora.errors import ConfigError, ShapeError, StateDictError
from minilora.tensor import Tensor


class Parameter(Tensor):
    """A Tensor that a Module owns and an optimizer may train (requires_grad is True by default)."""

    __slots__ = ()

    def __init__(self, data, requires_grad: bool = True, dtype=None):
        super().__init__(data, requires_grad=requires_grad, dtype=dtype)

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()


class LoadResult(NamedTuple):
    """Keys that ``load_state_dict(strict=False)`` skipped."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class Module:
    """Base class of every layer and model. Subclasses assign parameters and submodules in
    ``__init__`` and compute in ``forward``; calling the module calls ``forward``."""

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    # ---- registration ----------------------------------------------------------------------
    def __setattr__(self, name: str, value) -> None:
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.__init__ must call "
                                 "super().__init__() first")
        # A new value of the same kind keeps its place in the order (as in PyTorch), so replacing a
        # Linear by a LoRALinear does not reorder named_parameters() or state_dict().
        if isinstance(value, Parameter):
            self._modules.pop(name, None)
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._parameters.pop(name, None)
            self._modules[name] = value
        else:
            self._parameters.pop(name, None)
            self._modules.pop(name, None)
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        object.__delattr__(self, name)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    # ---- walking the tree ------------------------------------------------------------------
    def children(self) -> Iterator[Module]:
        yield from self._modules.values()

    def named_children(self) -> Iterator[tuple[str, Module]]:
        yield from self._modules.items()

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """(dotted name, module) for this module ('' or ``prefix``) and every descendant."""
        seen: set[int] = set()
        stack = [(prefix, self)]
        while stack:
            name, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            yield name, module
            children = [(f"{name}.{n}" if name else n, m) for n, m in module._modules.items()]
            stack.extend(reversed(children))

    def modules(self) -> Iterator[Module]:
        for _, module in self.named_modules():
            yield module

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """(dotted name, parameter) for every parameter, each shared one once."""
        seen: set[int] = set()
        for mod_name, module in self.named_modules(prefix):
            for name, p in module._parameters.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self) -> Iterator[Parameter]:
        for _, p in self.named_parameters():
            yield p

    def get_submodule(self, target: str) -> Module:
        """The module at dotted path ``target`` ('' is this module)."""
        module = self
        for part in target.split(".") if target else []:
            child = module._modules.get(part)
            if child is None:
                raise StateDictError(f"{type(module).__name__} has no submodule {part!r} "
                                     f"(in {target!r})")
            module = child
        return module

    def set_submodule(self, target: str, new: Module) -> None:
        """Replace the module at dotted path ``target`` (which must exist) by ``new``."""
        parent_name, _, leaf = target.rpartition(".")
        parent = self.get_submodule(parent_name)
        if leaf not in parent._modules:
            raise StateDictError(f"{type(parent).__name__} has no submodule {leaf!r} "
                                 f"(in {target!r})")
        setattr(parent, leaf, new)

    # ---- modes and bulk changes ------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        for module in self.modules():
            object.__setattr__(module, "training", bool(mode))
        return self

    def eval(self) -> Module:
        return self.train(False)

    def requires_grad_(self, flag: bool = True) -> Module:
        for p in self.parameters():
            p.requires_grad_(flag)
        return self

    def zero_grad(self) -> None:
        """Forget every parameter's gradient (set to None, so nothing is allocated)."""
        for p in self.parameters():
            p.grad = None

    def astype(self, dtype) -> Module:
        """Convert every parameter to ``dtype`` in place (e.g. ``np.float64`` for gradient checks).

        Only floating-point dtypes: a parameter must be able to carry a gradient.
        """
        dtype = np.dtype(dtype)
        if not np.issubdtype(dtype, np.floating):
            raise ConfigError(f"{type(self).__name__}.astype: parameters must be floating point, "
                              f"got {dtype}")
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = None if p.grad is None else p.grad.astype(dtype)
        return self

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.size for p in self.parameters() if p.requires_grad or not trainable_only)

    # ---- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """name -> a copy of the parameter's array, for every parameter (shared ones once)."""
        return {name: p.data.copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state: Mapping[str, np.ndarray], strict: bool = True) -> LoadResult:
        """Copy arrays from ``state`` into the parameters of the same name, converting dtype.

        Every key is checked before any parameter changes: with ``strict``, a missing or extra key
        is an error; a mis-shaped array always is. The error names the keys and the shapes.
        """
        params = dict(self.named_parameters())
        missing = [k for k in params if k not in state]
        unexpected = [k for k in state if k not in params]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing keys {missing}")
            if unexpected:
                parts.append(f"unexpected keys {unexpected}")
            raise StateDictError(f"{type(self).__name__}.load_state_dict: " + "; ".join(parts))
        updates = []
        for name, p in params.items():
            if name not in state:
                continue
            value = np.asarray(state[name])
            if value.shape != p.shape:
                raise ShapeError(
                    f"{type(self).__name__}.load_state_dict: {name!r} has shape {value.shape}, "
                    f"the model expects {p.shape}"
                )
            if not (np.issubdtype(value.dtype, np.floating)
                    or np.issubdtype(value.dtype, np.integer)):
                raise StateDictError(f"load_state_dict: {name!r} has non-numeric dtype "
                                     f"{value.dtype}")
            updates.append((p, value))
        for p, value in updates:  # all checked: now change the model
            p.data = np.array(value, dtype=p.dtype)
        return LoadResult(missing, unexpected)

    # ---- printing --------------------------------------------------------------------------
    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._modules.items():
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"


class ModuleList(Module):
    """A list of modules registered as children ``0``, ``1``, … (as GPT-2's ``transformer.h``)."""

    def __init__(self, modules=()) -> None:
        super().__init__()
        for module in modules:
            self.append(module)

    def append(self, module: Module) -> ModuleList:
        setattr(self, str(len(self._modules)), module)
        return self

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(list(self._modules.values()))

"""Activation checkpointing: run a module without keeping its activations, and recompute them
in the backward pass (PyTorch's ``torch.utils.checkpoint``, reentrant form).

The forward pass runs ``function`` under [`no_grad`][minilora.tensor.no_grad], so nothing inside it
is saved for backward: only the inputs are kept. When the backward pass reaches it, the function
runs again with the graph recorded, and its own backward pass gives the inputs' gradients and
accumulates its parameters'. The random generators the function draws from (dropout's) are set
back to their state of the first run while it runs again, so it draws the same masks, and then
returned to where they are: the gradients equal those without checkpointing bit for bit
(tests/models/test_training_memory.py), at the cost of a second forward pass of the function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from minilora.nn.module import Module
from minilora.tensor import Tensor, enable_grad, no_grad


def generators(module: Module) -> list[np.random.Generator]:
    """Every Generator held by ``module`` or its descendants (dropout's, LoRA dropout's), once."""
    found: dict[int, np.random.Generator] = {}
    for m in module.modules():
        for value in vars(m).values():
            if isinstance(value, np.random.Generator):
                found.setdefault(id(value), value)
    return list(found.values())


def checkpoint(function: Callable[..., Tensor], *inputs: Tensor,
               parameters: Iterable[Tensor] = (),
               rngs: Iterable[np.random.Generator] = ()) -> Tensor:
    """``function(*inputs)``, its activations recomputed in the backward pass instead of kept.

    inputs: the Tensors it takes (their gradients are returned to the graph); parameters: those it
    reads on its own, the module's (their ``.grad`` is accumulated when it runs again; they make the
    output need a gradient even when no input does, as block 0's input in LoRA); rngs: the
    generators it draws from, replayed. For a Module, [`checkpoint_module`][] finds both.
    """
    rngs = list(rngs)
    parameters = [p for p in parameters if p.requires_grad]
    states = [g.bit_generator.state for g in rngs]
    with no_grad():
        out = function(*(Tensor(t.data) for t in inputs))
    datas, wants = [t.data for t in inputs], [t.requires_grad for t in inputs]

    def backward(g):
        now = [r.bit_generator.state for r in rngs]
        for r, state in zip(rngs, states, strict=True):
            r.bit_generator.state = state  # the first run's masks again
        try:
            leaves = [Tensor(a, requires_grad=w) for a, w in zip(datas, wants, strict=True)]
            with enable_grad():
                again = function(*leaves)
        finally:
            for r, state in zip(rngs, now, strict=True):
                r.bit_generator.state = state
        if again.requires_grad:
            again.backward(g)  # accumulates the parameters' gradients as the plain walk would
        return [leaf.grad for leaf in leaves] + [None] * len(parameters)

    return Tensor.from_op(out.data, (*inputs, *parameters), backward)


def checkpoint_module(module: Module, *inputs: Tensor) -> Tensor:
    """[`checkpoint`][] of ``module(*inputs)``, with its parameters and generators."""
    return checkpoint(module, *inputs, parameters=module.parameters(), rngs=generators(module))

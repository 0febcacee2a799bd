"""Where a training step's memory goes: parameters, gradients, optimizer state, activations.

NumPy reports its array allocations to ``tracemalloc``, so one traced step shows what the graph
holds after the forward pass (the activations saved for backward) and the highest point the step
reaches. Parameters and optimizer state exist before the step and are counted by their sizes.
"""

from __future__ import annotations

import tracemalloc
from dataclasses import dataclass


@dataclass
class StepMemory:
    """Bytes. ``peak`` = parameters + optimizer state + the step's highest transient use."""

    parameters: int
    trainable: int
    gradients: int
    optimizer_state: int
    activations: int
    transient_peak: int

    @property
    def peak(self) -> int:
        return self.parameters + self.optimizer_state + self.transient_peak

    def as_dict(self) -> dict:
        return {"parameters": self.parameters, "trainable": self.trainable,
                "gradients": self.gradients, "optimizer_state": self.optimizer_state,
                "activations": self.activations, "transient_peak": self.transient_peak,
                "peak": self.peak}


def _nbytes(arrays) -> int:
    return sum(a.nbytes for a in arrays)


def measure_step(model, x, y, optimizer) -> StepMemory:
    """Run one full training step (forward, backward, optimizer step) under tracemalloc.

    The optimizer should already have taken a step, so its state exists and is counted as such.
    The step really updates the model.
    """
    params = list(model.parameters())
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start, _ = tracemalloc.get_traced_memory()
        _, loss = model(x, y, skip_logits=True)
        after_forward, _ = tracemalloc.get_traced_memory()
        loss.backward()
        del loss
        grads = _nbytes(p.grad for p in params if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        if not was_tracing:
            tracemalloc.stop()
    state = _nbytes(a for s in optimizer.state.values() for a in s.values()
                    if hasattr(a, "nbytes"))
    return StepMemory(parameters=_nbytes(p.data for p in params),
                      trainable=_nbytes(p.data for p in params if p.requires_grad),
                      gradients=grads, optimizer_state=state,
                      activations=after_forward - start, transient_peak=peak - start)

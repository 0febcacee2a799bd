"""``minilora bench``: training-step speed and memory against the machine's limit and PyTorch.

For each named config it times full training steps (zero-grad, forward, loss, backward, AdamW
step) after warm-up, for full fine-tuning and for LoRA (r=8, alpha=16 on ``c_attn`` and
``c_proj``), and prints median ms/step, tokens/s, GFLOP/s and peak memory. Two references are
measured in the same run:

- the limit: NumPy's own float32 matmul throughput for exactly the products the step computes
  (recorded shape by shape), i.e. the time the step would take if it were nothing but BLAS;
- the peer (``--compare torch``): the same model trained in PyTorch on the CPU with the same
  number of threads. It lives in ``benchmarks/torch_peer.py`` of the source tree, never in the
  package; without PyTorch (or outside a source checkout) it is skipped with a note.

The steps and both references take turns (ours, NumPy's, PyTorch's, and again), one at a time, so
that the ratios do not depend on which of them ran while the machine was fast.
"""

from minilora.bench.measure import machine, measure, run
from minilora.bench.references import NumpyLimit, TorchPeer
from minilora.bench.report import main, report
from minilora.bench.step import (
    CONFIGS,
    LORA,
    BenchConfig,
    analytic_flops,
    build,
    product_flops,
    train_step,
)

__all__ = ["CONFIGS", "LORA", "BenchConfig", "NumpyLimit", "TorchPeer", "analytic_flops", "build",
           "machine", "main", "measure", "product_flops", "report", "run", "train_step"]

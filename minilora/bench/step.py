"""What the benchmark times: its configs, one training step, and the FLOPs that step computes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minilora.lora import LoRAConfig, apply_lora
from minilora.models import GPT, GPTConfig
from minilora.ops.backend.attention import attention_spans
from minilora.optim import AdamW, param_groups


@dataclass(frozen=True)
class BenchConfig:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int
    vocab_size: int = 65

    def gpt(self) -> GPTConfig:
        return GPTConfig(vocab_size=self.vocab_size, block_size=self.block_size,
                         n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd)


CONFIGS = {
    "A": BenchConfig(4, 4, 128, 64, 12),  # nanoGPT's CPU config for tiny Shakespeare
    "B": BenchConfig(6, 6, 384, 256, 16),  # nanoGPT's Shakespeare model, a CPU-sized batch
    # GPT-2 small's shape (124M parameters) at block 256 and batch 4: 1,024 tokens a step, the
    # batch a 2-core machine steps through in seconds (docs/performance.md, config C)
    "C": BenchConfig(12, 12, 768, 256, 4, vocab_size=50257),
}
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ("c_attn", "c_proj")}


def analytic_flops(cfg: BenchConfig, lora: bool) -> int:
    """Matmul FLOPs (2 per multiply-add) of one training step, counted from the architecture.

    Full: every product of the forward pass, then two of the same size in backward (dX and dW);
    causal attention computes only the row blocks' visible keys
    (``ops.backend.attention.attention_spans``).
    LoRA: no dW for any frozen weight; the adapters' own products (4 per adapted layer backward,
    2 forward); and no dX into layer 0's c_attn, whose input depends on frozen weights only.
    """
    n, c, t, v = cfg.batch_size * cfg.block_size, cfg.n_embd, cfg.block_size, cfg.vocab_size
    linears = [(c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)]  # (in, out): c_attn, attn.c_proj, mlp
    # q k^T and P v over all heads, for the query rows and keys each causal row block computes
    visible = sum((r1 - r0) * k1 for r0, r1, k1 in attention_spans(t, t, causal=True))
    attention = 2 * (2 * cfg.batch_size * visible * c)
    per_layer = sum(2 * n * i * o for i, o in linears) + attention
    forward = cfg.n_layer * per_layer + 2 * n * c * v  # + lm_head
    if not lora:
        return 3 * forward
    r = LORA["r"]
    adapted = [(c, 3 * c), (c, c), (4 * c, c)]  # c_attn, attn.c_proj, mlp.c_proj
    adapter_forward = sum(2 * n * r * (i + o) for i, o in adapted)
    adapter_backward = sum(2 * n * r * (2 * i + 2 * o) for i, o in adapted)  # G B, dB, dA, u A
    dx = sum(2 * n * i * o for i, o in linears)
    backward = cfg.n_layer * (dx + attention * 2 + adapter_backward) - 2 * n * c * 3 * c \
        - 2 * n * r * c + 2 * n * c * v  # layer 0's c_attn: no G W, no u A; lm_head: dX only
    return forward + cfg.n_layer * adapter_forward + backward


def product_flops(products) -> int:
    """FLOPs of recorded products [(a.shape, b.shape)]: 2 * batch * n * k * m each."""
    total = 0
    for sa, sb in products:
        batch = int(np.prod(np.broadcast_shapes(sa[:-2], sb[:-2])))
        total += 2 * batch * sa[-2] * sa[-1] * sb[-1]
    return total


def build(cfg: BenchConfig, lora: bool, seed: int = 0):
    """(model, optimizer, x, y) for one config, float32, dropout 0, weight decay 0.1."""
    model = GPT(cfg.gpt(), seed=seed)
    if lora:
        apply_lora(model, LoRAConfig(**LORA), rng=seed)
    opt = AdamW(param_groups(model.named_parameters(), 0.1), lr=1e-4)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size))
    y = rng.integers(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size))
    return model, opt, x, y


def train_step(model, opt, x, y) -> None:
    opt.zero_grad()
    _, loss = model(x, y, skip_logits=True)
    loss.backward()
    opt.step()

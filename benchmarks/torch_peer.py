"""The peer of ``minilora bench --compare torch``: the same GPT and LoRA, in PyTorch, on the CPU.

Not part of the package (minilora never imports torch). The model is nanoGPT's (fused c_attn,
PyTorch's causal scaled_dot_product_attention, GELU tanh, tied lm_head), LoRA is a frozen Linear
plus trainable A (r, in) and B (out, r) on c_attn and c_proj, and a step is the same: zero-grad,
forward, cross-entropy, backward, AdamW (weight decay 0.1 on >= 2-D parameters).
"""

import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features).uniform_(
            -1 / math.sqrt(base.in_features), 1 / math.sqrt(base.in_features)))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling


class Block(nn.Module):
    def __init__(self, c: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.c_attn, self.attn_proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.c_fc, self.mlp_proj = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg.n_embd, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def build(cfg, lora: bool, lora_cfg: dict):
    torch.manual_seed(0)
    model = GPT(cfg)
    if lora:
        model.requires_grad_(False)
        for block in model.h:
            block.c_attn = LoRALinear(block.c_attn, lora_cfg["r"], lora_cfg["lora_alpha"])
            block.attn_proj = LoRALinear(block.attn_proj, lora_cfg["r"], lora_cfg["lora_alpha"])
            block.mlp_proj = LoRALinear(block.mlp_proj, lora_cfg["r"], lora_cfg["lora_alpha"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-4)
    return model, opt


def serve(cfg, lora_cfg: dict, warmup: int, threads: int) -> None:
    """Answer ``minilora bench`` step by step: for each line it sends, time one full and one LoRA
    step and reply {"full": seconds, "lora": seconds} on a line of its own.

    ``minilora bench`` takes one step of its own, then one of ours, and so on, so that both see the
    same machine: a shared machine's speed drifts by 10-20% over minutes, which timing the two one
    after the other turned into the ratio (1.11 in one such run, 0.89-1.02 in others).
    """
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size)))
    y = torch.from_numpy(rng.integers(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size)))
    runs = {method: build(cfg, method == "lora", lora_cfg) for method in ("full", "lora")}

    def step_pair() -> dict:
        seconds = {}
        for method, (model, opt) in runs.items():
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            model(x, y).backward()
            opt.step()
            seconds[method] = time.perf_counter() - t0
        return seconds

    for _ in range(warmup):
        step_pair()
    print("ready", flush=True)
    for _ in sys.stdin:
        print(json.dumps(step_pair()), flush=True)


def main(argv=None) -> None:
    """``python torch_peer.py CONFIG_JSON LORA_JSON WARMUP THREADS``: warm up, print ``ready``,
    then answer each line on stdin with one timed full and LoRA step (see ``serve``).

    ``minilora bench`` runs the peer in a process of its own, so neither side's thread pools (or
    OpenBLAS's spinning threads) compete with the other's, and only one of them runs at a time.
    """
    from types import SimpleNamespace

    args = sys.argv[1:] if argv is None else argv
    cfg, lora_cfg = SimpleNamespace(**json.loads(args[0])), json.loads(args[1])
    serve(cfg, lora_cfg, warmup=int(args[2]), threads=int(args[3]))


if __name__ == "__main__":
    main()

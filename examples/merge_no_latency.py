"""Merged LoRA costs nothing at inference: time the base, the unmerged adapter and the merged model.

    python examples/merge_no_latency.py             # seconds to a minute (docs/performance.md)
    python examples/merge_no_latency.py --small     # a few seconds

An unmerged LoRA layer computes ``x W^T + b + s (x A^T) B^T``: two extra products per layer. After
``merge_and_unload`` the layer is ``x W'^T + b`` with ``W' = W + s B A``: the base model's shape
and the base model's cost. The LoRA paper (Hu et al. 2021, section 4.1) names "no additional
inference latency" as the point of merging, against adapter layers, which add depth for good.

1. Three models with the same base weights: the base, the base with LoRA (r = 8 on ``c_attn``,
   ``c_proj`` and ``c_fc``, with a non-zero ``B`` as after training), and that model merged.
2. The merged model gives the adapted model's outputs (to float32 round-off).
3. The extra multiply-adds of the unmerged adapter, counted from the shapes.
4. Timing, interleaved (each round times all three, in a rotating order) so that a busy machine
   slows them alike: one forward pass over a batch, and greedy generation for one prompt.

Time is the CPU time of this process (``time.process_time``) on one thread (``--threads 1``, the
default). On a machine shared with other jobs, wall-clock time also counts the moments the core
was busy elsewhere: here it varied by up to 20% between two models that compute the same thing.
CPU time on one thread is the compute cost itself, and repeated within a few percent. With more
threads it sums their work.
"""

import argparse
import os
import time

import numpy as np

from minilora import no_grad
from minilora.lora import LoRAConfig, apply_lora, lora_parameter_counts, merge_and_unload
from minilora.models import GPT, GPTConfig
from minilora.runtime import parallel

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--rounds", type=int, default=15, help="timed rounds per measurement")
parser.add_argument("--threads", type=int, default=1, help="threads for matrix products")
parser.add_argument("--small", action="store_true", help="a tiny model, few rounds (for CI)")
args = parser.parse_args()
small = args.small or os.environ.get("MINILORA_EXAMPLE_SMALL", "0") not in ("", "0")
if small:
    config = GPTConfig(vocab_size=46, block_size=32, n_layer=2, n_head=2, n_embd=32)
    rounds, batch, new_tokens = 3, 4, 4
else:
    config = GPTConfig(vocab_size=46, block_size=128, n_layer=4, n_head=4, n_embd=256)
    rounds, batch, new_tokens = args.rounds, 8, 32

# ---- 1. Three models ----------------------------------------------------------------------------
base = GPT(config, seed=0)
adapted = GPT(config, seed=0)                           # the same weights as base
lora = LoRAConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"])
apply_lora(adapted, lora, rng=0)
rng = np.random.default_rng(0)
for name, p in adapted.named_parameters():              # "train" the adapter: B != 0
    if name.endswith("lora_B"):
        p.data = rng.normal(0, 0.02, p.shape).astype(p.dtype)
merged = GPT(config, seed=0)
apply_lora(merged, lora, rng=0)
merged.load_state_dict(adapted.state_dict())
merged = merge_and_unload(merged)                       # plain Linear layers, W' = W + s B A
print(f"GPT {config.n_layer} layers x {config.n_embd} wide, {base.num_parameters():,} parameters;"
      f" LoRA r={lora.r} on {', '.join(lora.target_modules)}")

# ---- 2. Same outputs --------------------------------------------------------------------------
x = rng.integers(0, config.vocab_size, (batch, config.block_size))  # (B, T) token ids
with no_grad():
    y_base, y_adapted, y_merged = (m(x)[0].data for m in (base, adapted, merged))  # (B, T, V)
print(f"max |adapted - base|   = {np.abs(y_adapted - y_base).max():.2e}  (the adapter matters)")
print(f"max |merged - adapted| = {np.abs(y_merged - y_adapted).max():.2e}  (float32 round-off)")
assert np.abs(y_merged - y_adapted).max() < 1e-4 < np.abs(y_adapted - y_base).max()

# ---- 3. What the unmerged adapter adds ----------------------------------------------------------
counts = lora_parameter_counts(adapted)
base_macs = sum(c.weight_params for c in counts)        # x W^T: in * out per token and layer
extra_macs = sum(c.lora_params for c in counts)         # x A^T, then h B^T: r (in + out)
print(f"adapted layers: {len(counts)}; per token they do {base_macs:,} multiply-adds for x W^T "
      f"and {extra_macs:,} more for the adapter (+{100 * extra_macs / base_macs:.1f}%)")


# ---- 4. Timing ----------------------------------------------------------------------------------
def forward(model):
    model(x)                                            # (B, T) -> (B, T, V)


def generate(model):
    model.generate(x[:1, :8], new_tokens, temperature=0)  # one prompt, greedy


models = {"base": base, "adapter (unmerged)": adapted, "merged": merged}
results = {}
with parallel(args.threads), no_grad():
    for task, label in ((forward, f"forward, batch {batch}x{config.block_size}"),
                        (generate, f"generate {new_tokens} tokens, batch 1")):
        times = {name: [] for name in models}
        for model in models.values():                   # warm-up
            task(model)
        names = list(models)
        for i in range(rounds):
            for name in names[i % 3:] + names[:i % 3]:  # interleaved, the first one rotating
                t = time.process_time()
                task(models[name])
                times[name].append(time.process_time() - t)
        results[label] = {name: (1000 * min(ts), 1000 * float(np.median(ts)))
                          for name, ts in times.items()}

# The fastest round is the one least disturbed by other work (as timeit reports it); the median
# shows how much the rounds varied. The ratios use the fastest.
print(f"\n{rounds} interleaved rounds, {args.threads} thread(s); CPU ms, fastest (median):")
print(f"{'':<32}{'base':>15}{'adapter':>15}{'merged':>15}{'adapter/base':>14}{'merged/base':>13}")
for label, ms in results.items():
    (b, b_med), (a, a_med), (m, m_med) = ms["base"], ms["adapter (unmerged)"], ms["merged"]
    print(f"{label:<32}{b:>7.1f} ({b_med:>5.1f}){a:>7.1f} ({a_med:>5.1f}){m:>7.1f} ({m_med:>5.1f})"
          f"{a / b:>14.2f}{m / b:>13.2f}")

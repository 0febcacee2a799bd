"""What do the adapters learn? The LoRA paper's subspace analysis, on a small GPT.

    python examples/subspace_similarity.py --base runs/base --out runs/subspace   # 1-3 minutes
    python examples/subspace_similarity.py --small                                # a few seconds

Section 7 of the LoRA paper (Hu et al. 2021) asks two questions, and this example asks them again
of adapters on ``c_attn`` of a small GPT fine-tuned on ``builtin:majority``:

1. Do a rank-8 and a rank-64 adapter learn the same directions? The paper compares the top right-
   singular vectors of their ``A`` matrices (``A: (r, in)``; the right-singular vectors live in the
   input space) with the normalized subspace similarity

       phi(A1, A2, i, j) = ||U1_i^T U2_j||_F^2 / min(i, j)          in [0, 1]

   where ``U1_i`` holds the top ``i`` right-singular vectors of ``A1`` as columns. 1 means one
   subspace contains the other; two random subspaces of R^d give about max(i, j) / d. The paper
   found that the top direction of A_r=8 lies largely inside A_r=64's and the rest mostly do not:
   the update needs very few directions. Two rank-64 runs from different seeds share their top
   directions more than random matrices do.

2. How does the update ``ΔW = s B A`` relate to the frozen ``W``? Project ``W`` onto the top ``r``
   singular directions of ``ΔW`` (``U`` left, ``V`` right) and compare ``||U^T W V||_F`` with the
   same projection onto ``W``'s own top directions and onto random ones. The paper found ``ΔW``
   correlated with ``W`` more than a random matrix is, but in directions ``W`` does not
   emphasise, and amplified there: ``||ΔW||_F / ||U^T W V||_F`` was about 21.5 for r = 4 on GPT-3.

Three adapters are trained per seed set k of ``--seeds``: r=8 (seed 3k + 1) and r=64 (seeds 3k + 2
and 3k + 3), so that no two runs share an initial ``A``; set 0 is seeds 1, 2 and 3. The tables give
the mean and sample standard deviation over the sets, the heatmaps the mean. ``--alpha 2r`` (the
default) keeps s = 2 at both ranks; ``--alpha 16`` fixes alpha as the paper did. Output: a heatmap
PNG, a markdown table and a JSON file in ``--out``.

    python examples/subspace_similarity.py --base runs/base --seeds 0,1,2,3,4   # the docs', ~15 min
"""

import argparse
import json
import os
from pathlib import Path

import numpy as np
import scipy.linalg

from minilora.data import builtin_tokenizer, load_dataset
from minilora.lora import LoRAConfig, apply_lora
from minilora.models import GPT, GPTConfig
from minilora.optim import CosineSchedule
from minilora.train import TrainConfig, load_run, train

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--base", help="a full-model run directory to start from (default: pretrain)")
parser.add_argument("--out", default="runs/subspace", help="where results go")
parser.add_argument("--plot", help="the heatmap PNG (default: OUT/subspace_similarity.png)")
parser.add_argument("--iters", type=int, default=400, help="fine-tuning steps per adapter")
parser.add_argument("--layer", type=int, help="the block to plot (default: the middle one)")
parser.add_argument("--alpha", default="2r", help="'2r' (s = 2 at both ranks) or a number")
parser.add_argument("--seeds", default="0",
                    help="comma-separated seed sets; set k trains seeds 3k+1, 3k+2, 3k+3")
parser.add_argument("--small", action="store_true", help="a tiny model, few steps (for CI)")
args = parser.parse_args()
small = args.small or os.environ.get("MINILORA_EXAMPLE_SMALL", "0") not in ("", "0")
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
r_small, r_large, iters = (2, 8, 20) if small else (8, 64, args.iters)
seed_sets = [int(k) for k in args.seeds.split(",")]

# ---- The base and three adapters ----------------------------------------------------------------
tokenizer = builtin_tokenizer()
task_data = load_dataset("builtin:majority", tokenizer=tokenizer)
if args.base:
    base = load_run(args.base).model
else:
    shape = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32} if small else \
        {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64}
    steps = 60 if small else 600
    print(f"pretraining a base on builtin:world for {steps} steps ...")
    base = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, **shape), seed=0)
    train(base, load_dataset("builtin:world", tokenizer=tokenizer),
          TrainConfig(max_iters=steps, lr=1e-3, min_lr=1e-4, warmup_iters=steps // 10,
                      eval_interval=steps, eval_iters=10, seed=0), quiet=True)
base_weights, n_embd, n_layer = base.state_dict(), base.config.n_embd, base.config.n_layer
layer = n_layer // 2 if args.layer is None else args.layer


def adapt(r: int, seed: int) -> dict:
    """Fine-tune a rank-r adapter on c_attn from the base: each block's LoRA layer, the loss."""
    model = GPT(base.config, seed=seed)
    model.load_state_dict(base_weights)
    alpha = 2 * r if args.alpha == "2r" else float(args.alpha)
    apply_lora(model, LoRAConfig(r=r, lora_alpha=alpha, target_modules=["c_attn"]), rng=seed)
    A0 = [block.attn.c_attn.lora_A.data.copy() for block in model.transformer.h]  # (r, C) each
    config = TrainConfig(max_iters=iters, lr=5e-3, min_lr=5e-4, warmup_iters=iters // 10,
                         eval_interval=iters, eval_iters=10, seed=seed)
    result = train(model, task_data, config, quiet=True)
    layers = [block.attn.c_attn for block in model.transformer.h]
    moved = np.mean([np.linalg.norm(lo.lora_A.data - a0) / np.linalg.norm(a0)
                     for lo, a0 in zip(layers, A0, strict=True)])
    print(f"r={r:<3} seed {seed}: val loss {result.val_loss:.3f}; "
          f"||A - A_init|| / ||A_init|| = {moved:.2f} (mean over blocks)", flush=True)
    return {"layers": layers, "val_loss": result.val_loss, "moved": moved}


# AdamW's decoupled weight decay multiplies A by (1 - lr_t wd) each step: what that alone moves
schedule = CosineSchedule(5e-3, 5e-4, iters // 10, iters)
decay_only = 1 - np.prod([1 - schedule(it) * TrainConfig.weight_decay for it in range(iters)])
print(f"weight decay alone would give ||A - A_init|| / ||A_init|| = {decay_only:.3f}")


# ---- 1. Subspace similarity between the A matrices ----------------------------------------------
def right_singular_vectors(A: np.ndarray) -> np.ndarray:
    """A: (r, in) -> U: (in, r), orthonormal columns, largest singular value first."""
    _, _, vh = scipy.linalg.svd(A.astype(np.float64), full_matrices=False)  # vh: (r, in)
    return vh.T


def phi(A1: np.ndarray, A2: np.ndarray) -> np.ndarray:
    """phi[i-1, j-1] = ||U1_i^T U2_j||_F^2 / min(i, j) for all i <= r1, j <= r2."""
    U1, U2 = right_singular_vectors(A1), right_singular_vectors(A2)   # (in, r1), (in, r2)
    cos2 = (U1.T @ U2) ** 2                  # (r1, r2): squared cosines between directions
    overlap = cos2.cumsum(0).cumsum(1)       # ||U1_i^T U2_j||_F^2 for every (i, j) at once
    i = np.arange(1, len(cos2) + 1)[:, None]
    j = np.arange(1, cos2.shape[1] + 1)[None, :]
    return overlap / np.minimum(i, j)


def projections(W: np.ndarray, dW: np.ndarray, r: int, rng) -> dict:
    """||U^T W V||_F for the top-r singular directions of dW, of W itself, and of random ones."""
    U, _, Vt = scipy.linalg.svd(dW)               # U: (out, out), Vt: (in, in)
    sw = scipy.linalg.svdvals(W)                  # W's singular values, largest first
    Q1 = scipy.linalg.qr(rng.normal(size=(W.shape[0], r)), mode="economic")[0]  # (out, r)
    Q2 = scipy.linalg.qr(rng.normal(size=(W.shape[1], r)), mode="economic")[0]  # (in, r)
    along_dW = np.linalg.norm(U[:, :r].T @ W @ Vt[:r].T)   # W seen through ΔW's directions
    return {"norm_W": np.linalg.norm(W), "norm_dW": np.linalg.norm(dW),
            "proj_dW": along_dW, "proj_W": np.sqrt(np.sum(sw[:r] ** 2)),  # = ||Uw^T W Vw||
            "proj_random": np.linalg.norm(Q1.T @ W @ Q2),
            "amplification": np.linalg.norm(dW) / along_dW}


def analyse(k: int, rng) -> dict:
    """Train seed set k's three adapters; their phi statistics, heatmaps and projections."""
    runs = {"small": adapt(r_small, seed=3 * k + 1), "large": adapt(r_large, seed=3 * k + 2),
            "large2": adapt(r_large, seed=3 * k + 3)}
    A = {name: [lo.lora_A.data for lo in run["layers"]] for name, run in runs.items()}
    blocks, parts = [], []
    for n in range(n_layer):
        p_sl, p_ll = phi(A["small"][n], A["large"][n]), phi(A["large"][n], A["large2"][n])
        p_rand = phi(rng.normal(size=(r_large, n_embd)), rng.normal(size=(r_large, n_embd)))
        blocks.append({"phi_small_large_11": p_sl[0, 0],
                       "phi_small_large_mean_k": p_sl[:, :r_small].mean(),
                       "phi_large_large_11": p_ll[0, 0],
                       "phi_large_large_mean_k": p_ll[:r_small, :r_small].mean(),
                       "phi_random_mean_k": p_rand[:r_small, :r_small].mean()})
        for which, r in (("small", r_small), ("large", r_large)):
            lora_layer = runs[which]["layers"][n]
            W = lora_layer.weight.data.astype(np.float64)          # (3C, C): q, k, v stacked
            dW = lora_layer.delta_weight().astype(np.float64)      # (3C, C) = s B A
            for part, rows in (("q", slice(0, n_embd)), ("v", slice(2 * n_embd, 3 * n_embd))):
                parts.append({"block": n, "part": part, "r": r,
                              **projections(W[rows], dW[rows], r, rng)})   # W_q, ΔW_q: (C, C)
    maps = [phi(A["small"][layer], A["large"][layer]), phi(A["large"][layer], A["large2"][layer]),
            phi(rng.normal(size=(r_large, n_embd)), rng.normal(size=(r_large, n_embd)))]
    return {"seeds": [3 * k + 1, 3 * k + 2, 3 * k + 3], "blocks": blocks, "projections": parts,
            "maps": maps, **{f"{name}_{key}": run[key] for name, run in runs.items()
                             for key in ("val_loss", "moved")}}


print(f"fine-tuning three adapters on c_attn for {iters} steps each, for seed sets {args.seeds}")
rng = np.random.default_rng(0)
sets = [analyse(k, rng) for k in seed_sets]


def stat(values) -> str:
    """'mean' for one seed set, 'mean ± sample std' for several."""
    values = np.asarray(values, dtype=float)
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


# ---- 1. Subspace similarity between the A matrices ----------------------------------------------
k, rs, rl = r_small, r_small, r_large
summary = [f"| block | phi(A{rs}, A{rl}, 1, 1) | mean phi(A{rs}, A{rl}, i, j <= {k}) "
           f"| phi(A{rl}, A{rl}', 1, 1) | mean phi(A{rl}, A{rl}', i, j <= {k}) "
           f"| random, i, j <= {k} |",
           "| ---: | ---: | ---: | ---: | ---: | ---: |"]
stats = ("phi_small_large_11", "phi_small_large_mean_k", "phi_large_large_11",
         "phi_large_large_mean_k", "phi_random_mean_k")
for n in range(n_layer):
    summary.append(f"| {n} | " + " | ".join(stat([s["blocks"][n][key] for s in sets])
                                             for key in stats) + " |")
spread = " (mean ± sample standard deviation over the seed sets)" if len(sets) > 1 else ""
print(f"\nsubspace similarity of the A matrices (C = {n_embd}; two random subspaces of "
      f"dimensions i and j give about max(i, j) / {n_embd}){spread}")
print("\n".join(summary))

# ---- 2. ΔW against W -----------------------------------------------------------------------------
table = ["| block | part | r | ‖W‖ | ‖ΔW‖ | ‖UᵀWV‖, U, V of ΔW | of W | random "
         "| amplification ‖ΔW‖ / ‖UᵀWV‖ |",
         "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
for i, first in enumerate(sets[0]["projections"]):
    cells = [stat([s["projections"][i][key] for s in sets]) if key in ("norm_dW", "proj_dW",
             "proj_random", "amplification") else f"{first[key]:.2f}"   # W is the same base's
             for key in ("norm_W", "norm_dW", "proj_dW", "proj_W", "proj_random", "amplification")]
    table.append(f"| {first['block']} | W_{first['part']} | {first['r']} | " + " | ".join(cells)
                 + " |")
print("\nΔW against W: ||U^T W V||_F with U, V the top-r singular directions of ΔW, of W, "
      f"or random{spread}")
print("\n".join(table))
for key in ("small_val_loss", "large_val_loss", "large2_val_loss", "small_moved", "large_moved"):
    print(f"{key}: {stat([s[key] for s in sets])}")
(out / "subspace_similarity.md").write_text("\n".join(summary) + "\n\n" + "\n".join(table) + "\n")
results = {"layer": layer, "r_small": r_small, "r_large": r_large, "iters": iters,
           "alpha": args.alpha, "decay_only_moved": decay_only,
           "sets": [{key: value for key, value in s.items() if key != "maps"} for s in sets]}
(out / "subspace_similarity.json").write_text(json.dumps(results, indent=2, default=float))
maps = {f"phi(A_r={r_small}, A_r={r_large})": np.mean([s["maps"][0] for s in sets], axis=0),
        f"phi(A_r={r_large}, A'_r={r_large})": np.mean([s["maps"][1] for s in sets], axis=0),
        "random Gaussian, same shapes": np.mean([s["maps"][2] for s in sets], axis=0)}

# ---- The heatmaps -------------------------------------------------------------------------------
try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib is not installed: no plot (pip install 'minilora[plot]')")
    raise SystemExit(0) from None

panels = list(maps.items())
panels.insert(1, (f"{panels[0][0]}, j <= {r_small}", panels[0][1][:, :r_small]))
fig, axes = plt.subplots(1, 4, figsize=(16, 4.2),
                         gridspec_kw={"width_ratios": [2.2, 1, 2.2, 2.2]})
for ax, (title, m) in zip(axes, panels, strict=True):
    image = ax.imshow(m, vmin=0, vmax=1, cmap="magma", aspect="auto", interpolation="nearest",
                      extent=(0.5, m.shape[1] + 0.5, m.shape[0] + 0.5, 0.5))
    ax.set_title(title, fontsize=10)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("j")
    ax.set_ylabel("i")
fig.colorbar(image, ax=axes, fraction=0.02)
fig.suptitle(f"Normalized subspace similarity of lora_A's top right-singular directions, "
             f"block {layer} c_attn (C = {n_embd}, {iters} steps; mean of {len(sets)} seed "
             f"set(s))")
plot = Path(args.plot) if args.plot else out / "subspace_similarity.png"
plot.parent.mkdir(parents=True, exist_ok=True)
fig.savefig(plot, dpi=110, bbox_inches="tight")
print(f"\nwrote {plot}, {out / 'subspace_similarity.md'} and {out / 'subspace_similarity.json'}")

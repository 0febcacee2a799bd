"""The ``minilora`` command: demo, train, merge, export, generate, eval, params, bench.

A user mistake (a missing file, a bad setting, an adapter for another base) prints one line,
``minilora: error: ...``, on stderr and exits with code 2; nothing is left half-written.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import textwrap

from minilora.errors import MiniLoRAError

DESCRIPTION = """\
LoRA from first principles: pretrain a small GPT on the CPU, fine-tune it with LoRA or in full,
merge the adapter back, and compare.

main job:   minilora demo            (1-2.5 minutes on 2 cores; --quick: a smaller, faster run)
help:       minilora COMMAND --help  (every command has examples)

Hugging Face and PEFT: --init-from, --model and merge read a Hugging Face model directory,
--adapter a PEFT adapter; export and merge --format hf write them.
"""

TRAIN_DESCRIPTION = """\
Train a GPT: a new one (--data), a full fine-tune of a trained one (--init-from), or a LoRA
fine-tune (--init-from and --lora-r). Writes DIR/checkpoint.safetensors at every evaluation and
DIR/metrics.jsonl (one JSON line per evaluation: iter, train_loss, val_loss, lr, elapsed_s,
tokens_per_s). A LoRA run saves only its adapter, beside a reference to its base. The last
line gives the median ms per step of this session and the seconds of all the run's steps
(resumed ones too; evaluations and checkpoints in neither).
"""

TRAIN_EXAMPLES = """\
examples:
  # pretrain a base on a built-in corpus (no download)
  minilora train --data builtin:world --out runs/base --max-iters 600
  # fine-tune it with LoRA (rank 4, alpha 8) on c_attn and every c_proj (the attention's
  # output and the MLP's), on the built-in task
  minilora train --data builtin:majority --init-from runs/base --out runs/lora \\
      --lora-r 4 --lora-alpha 8 --target-modules c_attn,c_proj --max-iters 300 --lr 5e-3
  # the same in full
  minilora train --data builtin:majority --init-from runs/base --out runs/full --max-iters 300
  # continue a run that was stopped (Ctrl-C, a crash): bit for bit as if it never stopped
  # (with the same --threads; see --threads)
  minilora train --out runs/lora --resume
  # extend a finished run to 600 steps (the learning rate stays at --min-lr past the old end)
  minilora train --out runs/lora --resume --max-iters 600
  # a LoRA run whose base has moved
  minilora train --out runs/lora --resume --base /elsewhere/base
  # fine-tune a Hugging Face GPT-2 directory (its tokenizer reads the data)
  minilora train --data notes.txt --init-from gpt2-dir --out runs/hf --lora-r 8 --max-iters 200
  # a Llama or Qwen2 directory: LoRA on q_proj, v_proj; the sequence length is the run's
  minilora train --data notes.txt --init-from llama-dir --out runs/llama --lora-r 8 \\
      --block-size 128 --max-iters 200
  # a new model whose tokenizer reads any text later (UTF-8 bytes, 256 ids)
  minilora train --data notes.txt --out runs/bytes --tokenizer byte
  # instruction data: the loss on the completions only; 4 batches of 8 per step
  minilora train --data examples/majority.jsonl --init-from runs/base --out runs/sft \\
      --lora-r 4 --max-iters 200 --batch-size 8 --grad-accum 4
  # nanoGPT's CPU run on tiny Shakespeare (the defaults are its settings)
  minilora train --data shakespeare.txt --out runs/shakespeare

built-in corpora: builtin:world (English-like prose, to pretrain on),
                  builtin:majority (a task to adapt to, scored by exact match)
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line, ``minilora: error: ...``, and exit code 2, and
    an unknown flag is reported by the command it was given to, with the flag it may mean."""

    def error(self, message: str):
        command = self.prog.removeprefix("minilora").strip()
        self.exit(2, f"minilora: error: {command + ': ' if command else ''}{message} "
                     f"(see '{self.prog} --help')\n")

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self._commands.get(getattr(parsed, "command", None), self)
            command.error(f"unrecognized arguments: {' '.join(extras)}"
                          f"{_did_you_mean(extras, command)}")
        return parsed


def _did_you_mean(extras: list[str], parser: argparse.ArgumentParser) -> str:
    """'; did you mean --lora-r?' for ``--lora_r`` (nanoGPT's and PEFT's spelling), or for a
    near miss such as ``--max-iter``; '' when nothing is close."""
    flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    meant = []
    for extra in extras:
        name = extra.split("=", 1)[0]
        if not name.startswith("--") or name in flags:
            continue
        close = difflib.get_close_matches(name.replace("_", "-"), flags, n=1, cutoff=0.75)
        meant += [c for c in close if c not in meant]
    return f"; did you mean {', '.join(meant)}?" if meant else ""


def _int_at_least(low: int, expected: str):
    """An argparse type: an integer >= ``low``, else a message saying ``expected``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "an integer >= 0")


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _shape(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        rows, cols = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected OUTxIN such as 4096x4096, got {text!r}") \
            from None
    if rows < 1 or cols < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return rows, cols


def _sub(sub, name: str, help: str, description: str, examples: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=textwrap.dedent(description),
                          epilog=textwrap.dedent(examples),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_train(sub) -> None:
    from minilora.models import GPTConfig
    from minilora.train import TrainConfig

    d, m = TrainConfig(), GPTConfig()  # a new run's defaults: nanoGPT's tiny Shakespeare CPU model
    p = sub.add_parser("train", help="pretrain, fine-tune in full, or fine-tune with LoRA",
                       description=TRAIN_DESCRIPTION, epilog=TRAIN_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", metavar="FILE|builtin:NAME",
                   help="a UTF-8 text file (90/10 train/val split; tokens: see --tokenizer, "
                        "or the --init-from model's), a FILE.jsonl of {\"prompt\": ..., "
                        "\"completion\": ...} lines (the loss on the completions only), or a "
                        "built-in corpus")
    p.add_argument("--out", required=True, metavar="DIR", help="the run directory")
    p.add_argument("--init-from", metavar="DIR",
                   help="fine-tune this model: a full run (merge a LoRA run first) or a Hugging "
                        "Face model directory, whose tokenizer then reads --data")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with its settings "
                        "(--max-iters N moves its end)")
    p.add_argument("--base", metavar="DIR",
                   help="with --resume: where a LoRA run's base is now, if it moved")
    g = p.add_argument_group("model (a new model only; --init-from keeps the base's)")
    g.add_argument("--n-layer", type=_positive_int, metavar="N",
                   help=f"transformer blocks (default: {m.n_layer})")
    g.add_argument("--n-head", type=_positive_int, metavar="N",
                   help=f"attention heads; must divide --n-embd (default: "
                        f"{m.n_head})")
    g.add_argument("--n-embd", type=_positive_int, metavar="N",
                   help=f"width (default: {m.n_embd})")
    g.add_argument("--block-size", type=_positive_int, metavar="T",
                   help=f"context length in tokens (default: {m.block_size}); with --init-from, "
                        "the training sequence length (a GPT's own by default, at most it; a "
                        "Llama or Qwen2 has none and needs it)")
    g.add_argument("--dropout", type=_number, metavar="P",
                   help="dropout in [0, 1) (default: 0; with --init-from: the base's)")
    g.add_argument("--dtype", choices=("float32", "float64"), help="(default: float32)")
    g.add_argument("--no-bias", action="store_true",
                   help="no biases in Linear and LayerNorm layers (nanoGPT's own default)")
    g.add_argument("--tokenizer", choices=("char", "byte"),
                   help="char: the text's characters (default); byte: UTF-8 bytes, 256 ids, "
                        "so that any text can be read later")
    g = p.add_argument_group("optimisation (AdamW, cosine schedule with linear warm-up)")
    g.add_argument("--batch-size", type=_positive_int, metavar="B",
                   help=f"(default: {d.batch_size})")
    g.add_argument("--max-iters", type=_nonneg_int, metavar="N",
                   help=f"training steps (default: {d.max_iters}); with --resume, where the run "
                        "ends now (a finished run goes on)")
    g.add_argument("--lr", type=_number, help=f"peak learning rate (default: {d.lr:g})")
    g.add_argument("--min-lr", type=_number, metavar="LR",
                   help=f"learning rate at the end of the cosine (default: {d.min_lr:g})")
    g.add_argument("--lr-decay-iters", type=_nonneg_int, metavar="N",
                   help="where the cosine reaches --min-lr, which holds after it (default: "
                        "--max-iters)")
    g.add_argument("--warmup-iters", type=_nonneg_int, metavar="N",
                   help=f"(default: {d.warmup_iters}, or a tenth of --max-iters if smaller)")
    g.add_argument("--weight-decay", type=_number, metavar="WD",
                   help=f"decoupled, on weights of 2 or more dimensions (default: "
                        f"{d.weight_decay:g})")
    g.add_argument("--grad-clip", type=_number, metavar="NORM",
                   help=f"clip the gradient norm; 0 disables clipping (default: {d.grad_clip:g})")
    g.add_argument("--grad-accum", type=_positive_int, metavar="N",
                   dest="gradient_accumulation_steps",
                   help="add up the gradients of N batches of --batch-size per step: the step "
                        "of one batch N times larger, at the memory of one (default: 1)")
    g.add_argument("--eval-interval", type=_positive_int, metavar="N",
                   help=f"evaluate and checkpoint every N steps (default: {d.eval_interval})")
    g.add_argument("--eval-iters", type=_positive_int, metavar="N",
                   help=f"batches per evaluation and split (default: {d.eval_iters})")
    g.add_argument("--seed", type=_nonneg_int, help=f"same seed, same run, bit for bit on one "
                   f"machine with the same --threads (default: {d.seed})")
    g.add_argument("--skip-nonfinite", action="store_true",
                   help="skip steps whose loss or gradient is NaN/inf instead of stopping")
    g.add_argument("--loraplus-lr-ratio", type=_number, metavar="RATIO",
                   help="LoRA+: lora_B (and 1-D parameters) at --lr times RATIO, PEFT's groups "
                        "(e.g. 16; default: off)")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass: less memory, "
                        "a slower step, the same gradients")
    _add_lora_flags(p)
    _add_common(p)


def _add_lora_flags(p) -> None:
    g = p.add_argument_group("LoRA (with --init-from; without --lora-r, fine-tuning is full)")
    g.add_argument("--lora-r", type=_positive_int, metavar="R", help="adapter rank, e.g. 4")
    g.add_argument("--lora-alpha", type=_number, metavar="ALPHA",
                   help="scaling s = alpha / r (default: 2 * r)")
    g.add_argument("--lora-dropout", type=_number, metavar="P",
                   help="dropout on the adapter's input (default: 0)")
    g.add_argument("--target-modules", metavar="NAMES",
                   help="comma-separated module names, each matching every Linear or "
                        "Embedding whose dotted name ends in it, as in PEFT (default: "
                        "c_attn,c_proj on a GPT, where c_proj is both attn.c_proj and "
                        "mlp.c_proj; q_proj,v_proj on a Llama or Qwen2; also "
                        "c_fc, wte for the token embedding, or full names such as "
                        "transformer.h.0.attn.c_attn); a name matching nothing is an error")
    g.add_argument("--use-rslora", action="store_true", help="scale by alpha / sqrt(r)")
    g.add_argument("--use-dora", action="store_true",
                   help="DoRA: also train a magnitude per output row, m / ||W + s B A|| "
                        "(W + s B A), PEFT's use_dora (Linear layers only)")
    g.add_argument("--lora-targets", metavar="ROLES",
                   help="the LoRA paper's weights to adapt, by role: q, k, v (slices of c_attn, "
                        "each its own adapter), o (attn.c_proj), mlp (c_fc, mlp.c_proj) or all; "
                        "q,v is the paper's choice (on a Llama: q_proj, k_proj, v_proj, o_proj, "
                        "mlp: gate_proj, up_proj, down_proj). With --target-modules, both are "
                        "adapted")
    g.add_argument("--init-lora-weights", metavar="INIT",
                   help="kaiming (default), gaussian, or pissa / olora: A and B from the SVD / "
                        "QR of W, W replaced by the residual W - s B A (PEFT's)")


def _add_common(p) -> None:
    p.add_argument("--quiet", action="store_true",
                   help="print only the result (no progress bar, no evaluation lines)")
    _add_threads(p)


def _add_threads(p) -> None:
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="threads for matrix products (default: all CPUs). The same --threads "
                        "gives the same bits; another gives the same bits for a model whose "
                        "largest product has 64M multiply-adds or more (the engine's threads), "
                        "float32 round-off for a smaller one (BLAS's threads): docs/engine.md")


def build_parser() -> argparse.ArgumentParser:
    from minilora import __version__

    parser = _Parser(prog="minilora", description=DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"minilora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_demo, _add_train, _add_merge, _add_export, _add_generate, _add_eval,
                _add_params, _add_bench):
        add(sub)
    for add in (_add_check, _add_vectors):  # the conformance kit
        add(sub)
    parser._commands = sub.choices
    return parser


def _add_demo(sub) -> None:
    from minilora.demo import OUT_DIR

    p = _sub(sub, "demo", "the main job: pretrain, fine-tune (full and LoRA), compare, merge", """\
        Pretrain a small GPT on builtin:world, fine-tune it on builtin:majority in full and with
        LoRA at ranks 1, 4 and 16 (alpha = 2r, on c_attn and c_proj), print one table (trainable
        parameters, validation loss, exact match, ms per step, peak memory), merge the best
        adapter, check merged and unmerged logits agree and time inference, print samples, and
        save runs, metrics, results.json and (with matplotlib) a plot of the loss curves in
        --out.""", """\
        examples:
          minilora demo                          # the full run: 1-2.5 minutes on 2 cores
          minilora demo --quick --out /tmp/demo  # a smaller model, fewer steps""")
    p.add_argument("--quick", action="store_true", help="a smaller model and fewer steps")
    p.add_argument("--out", default=OUT_DIR, metavar="DIR",
                   help=f"where runs, metrics and plots go (default: ./{OUT_DIR}); only the "
                        "demo's own run directories in it are replaced")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="(default: 0)")
    _add_common(p)


def _add_model_source(p, what: str = "a run directory or a Hugging Face model directory"):
    p.add_argument("--model", required=True, metavar="DIR", help=what)
    p.add_argument("--adapter", metavar="DIR",
                   help="a PEFT adapter directory to apply to --model (adapter_config.json, "
                        "adapter_model.safetensors)")
    p.add_argument("--base", metavar="DIR",
                   help="where a LoRA run's base is now, if it moved from where the run "
                        "recorded it")


def _add_merge(sub) -> None:
    p = _sub(sub, "merge", "merge a LoRA run's adapter into its base: a plain model", """\
        Fold W' = W + s B A into every adapted layer of a LoRA run (or of --model with a PEFT
        --adapter, as PEFT's merge_and_unload), check that the merged model's logits equal the
        unmerged ones (printing the largest difference), and save it as a plain model that
        generates, evaluates and fine-tunes like any other, at the base's cost: a minilora run
        directory, or a Hugging Face directory (--format hf) that transformers loads.""", """\
        examples:
          minilora merge --model runs/lora --out runs/merged
          minilora generate --model runs/merged --prompt 'fig cow owl: ' --temperature 0
          minilora merge --model runs/lora --out merged-hf --format hf
          minilora merge --model gpt2-dir --adapter adapter-dir --out merged-hf""")
    _add_model_source(p, "a LoRA run directory, or a Hugging Face model directory with --adapter")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="where the merged model goes (a new directory)")
    p.add_argument("--format", choices=("run", "hf"),
                   help="run: a minilora run directory; hf: config.json and model.safetensors, "
                        "as transformers' save_pretrained (default: the format --model is in)")


def _add_export(sub) -> None:
    p = _sub(sub, "export", "write a run's model or adapter as Hugging Face or PEFT files", """\
        Write a full run's model as a Hugging Face directory (--format hf: config.json,
        model.safetensors and, for a BPE tokenizer, tokenizer.json), which
        GPT2LMHeadModel.from_pretrained loads, or a LoRA run's adapter as a PEFT adapter
        directory (--format peft: adapter_config.json, adapter_model.safetensors), which
        PeftModel.from_pretrained loads on the base.""", """\
        examples:
          minilora export --model runs/base --out base-hf --format hf
          minilora export --model runs/lora --out lora-peft --format peft
          # in PyTorch: PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained('base-hf'),
          #                                       'lora-peft')""")
    p.add_argument("--model", required=True, metavar="DIR", help="a run directory")
    p.add_argument("--out", required=True, metavar="DIR", help="where the files go")
    p.add_argument("--format", required=True, choices=("hf", "peft"),
                   help="hf: a full run's model; peft: a LoRA run's adapter")
    p.add_argument("--base", metavar="DIR",
                   help="where a LoRA run's base is now, if it moved")


def _add_generate(sub) -> None:
    p = _sub(sub, "generate", "continue a prompt with a trained model", """\
        Sample a continuation of --prompt from a model (a full run, a LoRA run on its base, a
        merged one, or a Hugging Face directory, with a PEFT --adapter or without) and print the
        prompt and its continuation, token by token as they come (Ctrl-C stops and keeps what
        is printed). In the prompt, \\n is a newline, \\t a tab and \\\\ a backslash.""", """\
        examples:
          minilora generate --model runs/base --prompt 'the cat' --max-new-tokens 100
          minilora generate --model runs/lora --prompt '\\nfig cow owl plum: ' --temperature 0 \\
              --max-new-tokens 8
          minilora generate --model gpt2-dir --adapter adapter-dir --prompt 'Hello'""")
    _add_model_source(p)
    p.add_argument("--prompt", default="\\n", metavar="TEXT",
                   help="where to start (default: a newline)")
    p.add_argument("--max-new-tokens", type=_nonneg_int, default=200, metavar="N",
                   help="(default: 200)")
    p.add_argument("--temperature", type=_number, default=0.8, metavar="T",
                   help="0 is greedy: always the most likely token (default: 0.8)")
    p.add_argument("--top-k", type=_positive_int, metavar="K",
                   help="sample among the K most likely tokens only")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="(default: 0)")
    _add_threads(p)


def _add_eval(sub) -> None:
    p = _sub(sub, "eval", "validation loss (and task accuracy) of a trained model", """\
        The mean train and validation loss of a model on --data (over --eval-iters random
        batches per split) and, on a built-in task, the exact match of greedy completions on its
        200 held-out prompts.""", """\
        examples:
          minilora eval --model runs/lora --data builtin:majority
          minilora eval --model runs/shakespeare --data shakespeare.txt --eval-iters 200
          minilora eval --model gpt2-dir --adapter adapter-dir --data notes.txt""")
    _add_model_source(p)
    p.add_argument("--data", required=True, metavar="FILE|builtin:NAME",
                   help="a UTF-8 text file, a FILE.jsonl of prompt-completion lines (the loss "
                        "of the completions), or a built-in corpus")
    p.add_argument("--eval-iters", type=_positive_int, default=50, metavar="N",
                   help="(default: 50)")
    p.add_argument("--batch-size", type=_positive_int, default=12, metavar="B",
                   help="(default: 12)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="(default: 0)")
    p.add_argument("--block-size", type=_positive_int, metavar="T",
                   help="sequence length (default: the run's, else a GPT's block_size; a Llama "
                        "or Qwen2 directory has none and needs it)")
    _add_threads(p)


def _add_params(sub) -> None:
    p = _sub(sub, "params", "the parameter arithmetic of LoRA for one weight matrix", """\
        How many parameters LoRA trains for one (out, in) weight at rank r: A (r, in) and
        B (out, r) hold r (in + out) against the weight's in x out.""", """\
        examples:
          minilora params --shape 4096x4096 --rank 4   # 16,777,216 against 32,768: 1/512
          minilora params --shape 3x3 --rank 1         # 9 against 6
          minilora params --shape 4096x4096 --rank 4 --use-dora   # 36,864: 9/4096""")
    p.add_argument("--shape", required=True, type=_shape, metavar="OUTxIN",
                   help="the weight's shape, e.g. 4096x4096")
    p.add_argument("--rank", required=True, type=_positive_int, metavar="R", help="LoRA's rank")
    p.add_argument("--use-dora", action="store_true",
                   help="DoRA: count its magnitude too, one per output row")


def _add_bench(sub) -> None:
    p = _sub(sub, "bench", "time training steps against numpy's matmul peak and PyTorch", """\
        Time training steps of a fixed model and print them as ratios to numpy's own float32
        matmul throughput on this machine and, with --compare torch, to the same model in
        PyTorch on the CPU.""", """\
        examples:
          minilora bench --config A --steps 5
          minilora bench --config B --compare torch
          minilora bench --config C --steps 5 --warmup 1 --min-seconds 0 --compare torch""")
    p.add_argument("--config", action="append", choices=("A", "B", "C"),
                   help="repeatable; default A (C: GPT-2 small's shape)")
    p.add_argument("--steps", type=_positive_int, default=5, help="timed steps after warm-up")
    p.add_argument("--warmup", type=_nonneg_int, default=2)
    p.add_argument("--min-seconds", type=_number, default=3.0,
                   help="time more steps until the full ones add up to this (default: 3)")
    p.add_argument("--compare", choices=("torch",), help="also time the same model in PyTorch")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="also time the LoRA step with activation checkpointing, in turn")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--threads", type=_positive_int)


# ---- the conformance kit: check and vectors -------------------------------------------------

CHECK_DESCRIPTION = """\
Check what another LoRA implementation produced against minilora's float64 reference.

--merged DIR: a merged model (a Hugging Face directory, as merge_and_unload() then
save_pretrained() write it) against --base plus --adapter (a PEFT adapter directory). For every
adapted layer, W' = W + s B A with the adapter's own scaling (lora_alpha / r, rsLoRA
lora_alpha / sqrt(r), rank_pattern, alpha_pattern) and layout (fan_in_fan_out); every other
tensor must equal the base's. Each tensor gets a verdict: exact, round-off (within the bound its
dtype explains: float32, float16, bfloat16), unresolvable (the delta is below what the dtype
resolves, so the file cannot show whether it was merged) or WRONG, with a diagnosis when a
known mistake fits: scaling off by a factor (doubled, squared, missing, rsLoRA for plain),
the delta transposed, merged twice, not merged, merged into another layer, a tensor missing
or extra.

--logits FILE: someone's logits (.npy or .safetensors) for --input-ids (or the file's own
input_ids tensor) against the reference forward of --base with --adapter, per position.

Exit code 0: nothing is WRONG; 1: something is; 2: a usage error (a missing directory, a
damaged file). The bounds and their derivation: docs/conformance.md.
"""

CHECK_EXAMPLES = """\
example: a bfloat16 merge written by hand with two mistakes (docs/conformance.md)
  minilora check --base gpt2-base --adapter my-adapter --merged my-merged
    tensor                              dtype     ...  of bound  verdict    diagnosis
    transformer.h.0.attn.c_attn.weight  bfloat16  ...  0.481     round-off
    transformer.h.0.attn.c_proj.weight  bfloat16  ...  351       WRONG      delta transposed:
        (B A)^T was added (fan_in_fan_out, the (in, out) layout, mixed up)
    ...
    transformer.h.2.attn.c_attn.weight  bfloat16  ...  31.8      WRONG      plain scaling
        alpha/r = 2 used where the adapter says rsLoRA alpha/sqrt(r) = 4
    ...
    verdict: WRONG (31 exact, 7 round-off, 2 WRONG tensors)           (exit code 1)
other examples:
  # every tensor shown, and a JSON report for CI
  minilora check --base gpt2-base --adapter my-adapter --merged my-merged --all --json check.json
  # logits your code computed (B, T, V) for the token ids (B, T) in ids.npy
  minilora check --base gpt2-base --adapter my-adapter --logits logits.npy --input-ids ids.npy
"""


def _add_check(sub) -> None:
    from minilora.check.rounding import DTYPES

    p = sub.add_parser("check", help="check another implementation's merged model or logits "
                       "against the reference", description=CHECK_DESCRIPTION,
                       epilog=CHECK_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, metavar="DIR", help="the base model (Hugging Face "
                   "directory: config.json, model.safetensors)")
    p.add_argument("--adapter", required=True, metavar="DIR", help="the PEFT adapter directory "
                   "(adapter_config.json, adapter_model.safetensors)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--merged", metavar="DIR", help="the merged model to check")
    what.add_argument("--logits", metavar="FILE", help="logits to check (.npy or .safetensors)")
    p.add_argument("--input-ids", metavar="FILE", help="with --logits: the token ids (.npy or "
                   ".safetensors; default: the logits file's input_ids tensor)")
    p.add_argument("--computed-in", choices=DTYPES, help="with --logits: the dtype the logits "
                   "were computed in, which sets the tolerance (default: the file's dtype)")
    p.add_argument("--tolerance", type=_number, metavar="REL",
                   help="with --logits: the relative error per position to accept instead")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--all", action="store_true", help="print every row, not just those worth "
                   "reading")


def _add_vectors(sub) -> None:
    p = _sub(sub, "vectors", "write the golden vectors: LoRA test cases for other implementations",
             """\
        Write a versioned set of test cases for people implementing LoRA in another framework or
        language: for the LoRA linear layer (several shapes, ranks, alphas, rsLoRA, bias or not,
        a dropout mask) the inputs x, W, b, A, B, an upstream gradient G and the references y,
        dx, dA, dB, db and the merged W'; for a tiny GPT-2 with a LoRA adapter (as transformers
        and PEFT save them) the token ids, logits, loss and every gradient; and manifest.json:
        each case's settings, the tolerance per dtype and why, each file's SHA-256. The same
        version writes the same bits on every machine (docs/conformance.md says why).""", """\
        example:
          minilora vectors --out golden
          ls golden golden/lora_linear golden/gpt2_lora   # manifest.json says what each holds""")
    p.add_argument("--out", required=True, metavar="DIR", help="a new directory")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from minilora import commands
    from minilora.runtime import tune_malloc

    if args.command not in ("params",):
        tune_malloc()  # an application may change process-wide settings; the library never does
    try:
        return getattr(commands, f"cmd_{args.command}")(args) or 0
    except MiniLoRAError as e:
        print(f"minilora: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk or the file system said no: the user's to fix, not a bug
        where = f"{e.filename}: " if e.filename else ""
        print(f"minilora: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minilora: interrupted", file=sys.stderr)
        return 130


def _one_line(e: Exception) -> str:
    return " ".join(textwrap.dedent(str(e)).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The ``minilora`` command: demo, train, merge, generate, eval, params, bench.

A user mistake (a missing file, a bad setting, an adapter for another base) prints one line,
``minilora: error: ...``, and exits with code 2; nothing is left half-written.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from minilora.errors import MiniLoRAError

DESCRIPTION = """\
LoRA from first principles: pretrain a small GPT on the CPU, fine-tune it with LoRA or in full,
merge the adapter back, and compare.

main job:   minilora demo            (about 3 minutes on 2 cores; --quick: about 30 seconds)
"""

TRAIN_EXAMPLES = """\
examples:
  # pretrain a base on a built-in corpus (no download)
  minilora train --data builtin:world --out runs/base --max-iters 1000
  # fine-tune it with LoRA (rank 4, alpha 8) on attention, on the built-in task
  minilora train --data builtin:majority --init-from runs/base --out runs/lora \\
      --lora-r 4 --lora-alpha 8 --target-modules c_attn,c_proj --max-iters 400 --lr 3e-3
  # the same in full
  minilora train --data builtin:majority --init-from runs/base --out runs/full --max-iters 400
  # continue a run that was stopped
  minilora train --out runs/lora --resume
  # nanoGPT's CPU run on tiny Shakespeare
  minilora train --data shakespeare.txt --out runs/shakespeare --max-iters 2000

built-in corpora: builtin:world (English-like prose, to pretrain on),
                  builtin:majority (a task to adapt to, scored by exact match)
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


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


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="pretrain, fine-tune in full, or fine-tune with LoRA",
                       description="Train a GPT: from scratch, from --init-from in full, or with "
                                   "LoRA (--lora-r). Writes DIR/metrics.jsonl and "
                                   "DIR/checkpoint.safetensors.",
                       epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a UTF-8 text file, or builtin:NAME")
    p.add_argument("--out", required=True, metavar="DIR", help="the run directory")
    p.add_argument("--init-from", metavar="DIR", help="start from this run's model (fine-tuning)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    g = p.add_argument_group("model (new models only)")
    g.add_argument("--n-layer", type=_positive_int)
    g.add_argument("--n-head", type=_positive_int)
    g.add_argument("--n-embd", type=_positive_int)
    g.add_argument("--block-size", type=_positive_int)
    g.add_argument("--dropout", type=_number)
    g.add_argument("--dtype", choices=("float32", "float64"))
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=_positive_int)
    g.add_argument("--max-iters", type=_nonneg_int)
    g.add_argument("--lr", type=_number, help="peak learning rate")
    g.add_argument("--min-lr", type=_number)
    g.add_argument("--warmup-iters", type=_nonneg_int)
    g.add_argument("--weight-decay", type=_number)
    g.add_argument("--grad-clip", type=_number, help="0 disables clipping")
    g.add_argument("--eval-interval", type=_positive_int)
    g.add_argument("--eval-iters", type=_positive_int)
    g.add_argument("--seed", type=_nonneg_int)
    g.add_argument("--skip-nonfinite", action="store_true",
                   help="skip steps whose loss or gradient is NaN/inf instead of stopping")
    g = p.add_argument_group("LoRA (with --init-from)")
    g.add_argument("--lora-r", type=_positive_int, help="adapter rank; without it, fine-tuning "
                                                       "is full")
    g.add_argument("--lora-alpha", type=_number, help="scaling numerator (default: 2 * r)")
    g.add_argument("--lora-dropout", type=_number)
    g.add_argument("--target-modules", help="comma-separated, e.g. c_attn,c_proj")
    g.add_argument("--use-rslora", action="store_true", help="scale by alpha/sqrt(r)")
    _add_common(p)


def _add_common(p) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=_positive_int, help="threads for matrix products "
                                                         "(default: all CPUs)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minilora", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from minilora import __version__
    parser.add_argument("--version", action="version", version=f"minilora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="the main job: pretrain, fine-tune (full and LoRA), compare",
                       description="Pretrain a small GPT on builtin:world, fine-tune it on "
                                   "builtin:majority in full and with LoRA at ranks 1, 4, 16, "
                                   "print one table, merge the best adapter and check it.",
                       epilog="examples:\n  minilora demo\n  minilora demo --quick --out /tmp/d",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller run (about 30 s)")
    p.add_argument("--out", default="minilora-demo", metavar="DIR",
                   help="where runs, metrics and plots go (default: ./minilora-demo)")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    _add_common(p)

    _add_train(sub)

    p = sub.add_parser("merge", help="merge a LoRA run's adapter into its base: a plain model",
                       description="Fold W + s B A into every adapted layer, check that merged "
                                   "and unmerged logits agree, and save a plain model.",
                       epilog="example:\n  minilora merge --model runs/lora --out runs/merged",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR", help="a LoRA run directory")
    p.add_argument("--out", required=True, metavar="DIR", help="where the merged model goes")

    p = sub.add_parser("generate", help="continue a prompt with a trained model",
                       epilog="examples:\n  minilora generate --model runs/base --prompt 'the cat'"
                              "\n  minilora generate --model runs/lora --prompt 'fig cow owl: ' "
                              "--temperature 0",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=_nonneg_int, default=200)
    p.add_argument("--temperature", type=_number, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=_positive_int)
    p.add_argument("--seed", type=_nonneg_int, default=0)

    p = sub.add_parser("eval", help="validation loss (and task accuracy) of a trained model",
                       epilog="example:\n  minilora eval --model runs/lora --data builtin:majority",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR")
    p.add_argument("--data", required=True, help="a UTF-8 text file, or builtin:NAME")
    p.add_argument("--eval-iters", type=_positive_int, default=50)
    p.add_argument("--batch-size", type=_positive_int, default=12)
    p.add_argument("--seed", type=_nonneg_int, default=0)

    p = sub.add_parser("params", help="the parameter arithmetic of LoRA for one weight matrix",
                       epilog="examples:\n  minilora params --shape 4096x4096 --rank 4\n"
                              "  minilora params --shape 3x3 --rank 1",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", required=True, type=_shape, metavar="OUTxIN")
    p.add_argument("--rank", required=True, type=_positive_int)

    p = sub.add_parser("bench", help="time training steps against numpy's matmul peak and PyTorch",
                       epilog="examples:\n  minilora bench --config A --steps 5\n"
                              "  minilora bench --config B --compare torch",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", choices=("A", "B"), help="repeatable; default A")
    p.add_argument("--steps", type=_positive_int, default=5, help="timed steps after warm-up")
    p.add_argument("--warmup", type=_nonneg_int, default=2)
    p.add_argument("--compare", choices=("torch",), help="also time the same model in PyTorch")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--threads", type=_positive_int)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from minilora import commands

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


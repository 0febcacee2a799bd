"""What each ``minilora`` subcommand does (the parser is in ``minilora.cli``).

Each ``cmd_*`` takes the parsed arguments, prints what it did on stdout and returns the exit code.
A user mistake is raised as a [`minilora.MiniLoRAError`][]; ``cli.main`` turns it into one line,
``minilora: error: ...``, and exit code 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minilora.configs import naming_fields
from minilora.errors import (
    ConfigError,
    DataError,
    FileFormatError,
    MiniLoRAError,
    NonFiniteError,
)
from minilora.models import GPTConfig
from minilora.train import TrainConfig, architecture
from minilora.train.checkpoint import CHECKPOINT, METRICS

_MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "dtype")
_TRAIN_FLAGS = {f.name for f in dataclasses.fields(TrainConfig)} - {"on_nonfinite"}
_LORA_FLAGS = ("lora_alpha", "lora_dropout", "target_modules", "use_rslora", "lora_targets",
               "init_lora_weights", "use_dora")
# a config field the command line sets, and the flag that sets it
_FLAG_OF = {**{("TrainConfig", n): n for n in _TRAIN_FLAGS},
            **{("GPTConfig", n): n for n in (*_MODEL_FLAGS, "dropout")},
            **{("LoRAConfig", n): n for n in _LORA_FLAGS}, ("LoRAConfig", "r"): "lora_r",
            ("LoRAConfig", "target_slices"): "lora_targets",
            ("GPT", "lora_targets"): "lora_targets"}
_SHORT_FLAGS = {"gradient_accumulation_steps": "grad_accum"}  # the flags not named as the field


def _lora_targets(args, family) -> dict:
    """target_modules (and target_slices) from --target-modules and --lora-targets, on a model of
    the architecture ``family`` (whose default targets these flags replace)."""
    names = args.target_modules or ("" if args.lora_targets else ",".join(family.target_modules))
    targets = tuple(t.strip() for t in names.split(",") if t.strip())
    if not args.lora_targets:
        return {"target_modules": targets}
    roles = family.lora_targets(args.lora_targets)
    modules = roles["target_modules"] + tuple(t for t in targets
                                              if t not in roles["target_modules"])
    return {**roles, "target_modules": modules}


def _given(args, names) -> dict:
    """The flags among ``names`` that the user set (0 and 0.0 are set; None and False are not)."""
    return {n: getattr(args, n) for n in names
            if getattr(args, n, None) is not None and getattr(args, n) is not False}


def _flag(name: str) -> str:
    return "--" + _SHORT_FLAGS.get(name, name).replace("_", "-")


def _as_flag(owner: str, field: str) -> str | None:
    """How the command line names a config field: by its flag (``--lr``), where it has one."""
    flag = _FLAG_OF.get((owner, field))
    return None if flag is None else _flag(flag)


def _train_config(args) -> TrainConfig:
    given = _given(args, _TRAIN_FLAGS)
    if args.skip_nonfinite:
        given["on_nonfinite"] = "skip"
    if args.init_from is None:  # a new model's --block-size is the model's, which trains on it
        given.pop("block_size", None)
    if "warmup_iters" not in given and "max_iters" in given:  # a short run warms up for a tenth
        given["warmup_iters"] = min(TrainConfig().warmup_iters, given["max_iters"] // 10)
    return TrainConfig(**given)


def _say(text: str) -> None:
    """A line on stdout that does not break a progress bar on the terminal."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


def _eval_line(record: dict) -> str:
    speed = record.get("tokens_per_s")
    speed = f", {speed:,.0f} tokens/s" if speed else ""
    return (f"iter {record['iter']}: train loss {record['train_loss']:.4f}, val loss "
            f"{record['val_loss']:.4f}, lr {record['lr']:.3g}{speed}")


def cmd_train(args) -> int:
    from minilora.train import runs

    talk = {} if args.quiet else {"log": _say, "on_eval": lambda r: _say(_eval_line(r))}
    common = {"quiet": args.quiet, "threads": args.threads, **talk}
    try:
        if args.resume:
            settings = _given(args, (*_MODEL_FLAGS, "dropout", *_TRAIN_FLAGS - {"max_iters"},
                                     "lora_r", *_LORA_FLAGS, "data", "init_from",
                                     "skip_nonfinite", "no_bias", "tokenizer"))
            if settings:
                raise ConfigError("--resume continues with the run's own settings; drop "
                                  + ", ".join(_flag(n) for n in settings)
                                  + " (--max-iters and --base may change)")
            result = runs.resume(args.out, max_iters=args.max_iters, base=args.base, **common)
        else:
            config, model, lora = _new_run_settings(args)
            if model is not None:
                result = runs.pretrain(args.data, args.out, model, config,
                                       tokenizer=_new_tokenizer(args.tokenizer),
                                       **common)
            else:
                result = runs.finetune(args.init_from, args.data, args.out, config, lora,
                                       dropout=args.dropout, **common)
    except KeyboardInterrupt:
        return _interrupted(Path(args.out))
    _print_result(result, Path(args.out))
    return 0


def _new_run_settings(args):
    """(TrainConfig, the new model's GPTConfig fields or None, LoRAConfig or None) from the
    flags, every one checked before any data is read; a bad one is named by its flag."""
    from minilora.lora import LoRAConfig

    if args.data is None:
        raise ConfigError("train: --data FILE or --data builtin:NAME is required "
                          "(or --resume to continue the run in --out)")
    if args.init_from is None and args.lora_r is not None:
        raise ConfigError("--lora-r needs --init-from DIR: LoRA adapts a trained base")
    if args.base is not None:
        raise ConfigError("--base needs --resume (it says where a LoRA run's base moved to); a "
                          "new run's base is --init-from")
    if args.lora_r is None and _given(args, _LORA_FLAGS):
        raise ConfigError("LoRA settings need --lora-r (without it, training is full): "
                          + ", ".join(_flag(n) for n in _given(args, _LORA_FLAGS)))
    model = lora = None
    fixed = tuple(f for f in (*_MODEL_FLAGS, "no_bias", "tokenizer") if f != "block_size")
    with naming_fields(_as_flag):
        config = _train_config(args)
        family = None if args.init_from is None else architecture.of_directory(args.init_from)
        if family is not None:
            family.check_train_block(config.block_size)
            family.check_dropout(args.dropout)
        if args.init_from is None:
            model = _given(args, (*_MODEL_FLAGS, "dropout"))  # GPTConfig's defaults fill in
            if args.no_bias:
                model["bias"] = False
            GPTConfig(vocab_size=1, **model)  # check the architecture before any data
        elif _given(args, fixed):
            raise ConfigError(f"--init-from {args.init_from} fixes the architecture (and the "
                              "vocabulary); drop " + ", ".join(
                                  _flag(n) for n in _given(args, fixed)))
        elif args.lora_r is not None:
            lora = LoRAConfig(
                r=args.lora_r,
                lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_r,
                lora_dropout=args.lora_dropout if args.lora_dropout is not None else 0.0,
                use_rslora=args.use_rslora, use_dora=args.use_dora,
                **_lora_targets(args, family or architecture.GPT_ARCH),
                init_lora_weights=args.init_lora_weights or "kaiming")
        if args.dropout is not None:
            GPTConfig(vocab_size=1, dropout=args.dropout)  # checks it
    return config, model, lora


def _print_result(result, out: Path) -> None:
    if math.isnan(result.ms_per_step):  # no step ran: --max-iters 0, or the run had finished
        print(f"iter {result.iters} (no training steps ran): train loss "
              f"{result.train_loss:.4f}, val loss {result.val_loss:.4f}; the run in {out} is "
              "complete")
    else:  # the median step of this session; the sum of every step of the run, resumes too
        print(f"done: iter {result.iters}, train loss {result.train_loss:.4f}, val loss "
              f"{result.val_loss:.4f}; {result.ms_per_step:.1f} ms/step (median, "
              f"{result.tokens_per_s:,.0f} tokens/s), {result.elapsed_s:.1f} s in all the run's "
              "steps")
        print(f"saved {out / CHECKPOINT} and {out / METRICS}")
    if result.skipped_steps:
        print(f"skipped {result.skipped_steps} steps with non-finite numbers")


def _interrupted(out: Path) -> int:
    """Ctrl-C during training: say where the run can continue from (exit code 130, as a shell)."""
    from minilora.train import read_checkpoint

    try:
        it = read_checkpoint(out).meta["iter"]
    except (MiniLoRAError, OSError):
        print("minilora: interrupted before the first checkpoint; nothing to resume",
              file=sys.stderr)
    else:
        print(f"minilora: interrupted; the last checkpoint (iteration {it}) is in {out}: "
              f"continue with 'minilora train --out {out} --resume'", file=sys.stderr)
    return 130


def _new_tokenizer(kind: str | None):
    """A new run's tokenizer: None (characters: the text's own, or the built-in alphabet) or
    bytes (256 ids: any text)."""
    from minilora.data import ByteTokenizer

    return ByteTokenizer() if kind == "byte" else None


@dataclass
class _Source:
    """What ``--model`` (with ``--adapter``, ``--base``) names, opened."""

    model: object
    tokenizer: object
    run: object = None  # the LoadedRun of a run directory; None for a Hugging Face directory


def _open_model(args, need_tokenizer: bool = True) -> _Source:
    """The model of ``--model``: a run directory (a LoRA run on its base, found where it was
    recorded or at ``--base``) or a Hugging Face model directory (through ``minilora.hf``);
    then the PEFT adapter of ``--adapter`` on it, if given."""
    from minilora import hf
    from minilora.lora import named_lora_layers
    from minilora.train import load_run
    from minilora.train.sources import is_pretrained

    path, adapter, base = Path(args.model), getattr(args, "adapter", None), args.base
    if is_pretrained(path):
        if base is not None:
            raise ConfigError(f"--base: --model {path} is a Hugging Face model directory; "
                              "--base is where a LoRA run's base moved to")
        model = hf.from_pretrained(path)
        tokenizer = hf.load_tokenizer(path, model.config.vocab_size) \
            if hf.has_tokenizer(path) else None
        source = _Source(model, tokenizer)
    else:
        if path.is_dir() and not (path / CHECKPOINT).exists():
            raise FileFormatError(f"{path}: neither a minilora run directory (no {CHECKPOINT}) "
                                  "nor a Hugging Face model directory (no config.json)")
        run = load_run(path, base=base)
        source = _Source(run.model, run.tokenizer, run)
    if adapter is not None:
        if any(True for _ in named_lora_layers(source.model)):
            raise ConfigError(f"--adapter: --model {path} is a LoRA run, with an adapter of its "
                              "own; give its base (or the merged model) as --model")
        hf.load_adapter(source.model, adapter)
    if need_tokenizer and source.tokenizer is None:
        raise DataError(f"{path}: the model comes with no tokenizer (a Hugging Face directory: "
                        "tokenizer.json, or vocab.json and merges.txt)")
    return source


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` in a prompt typed on the command line become a newline, a
    tab and a backslash; every other character (any other backslash, any non-ASCII letter) is
    kept as it is."""
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)


def cmd_generate(args) -> int:
    from minilora.models import TextStreamer
    from minilora.runtime import step_threading
    from minilora.train.loop import largest_product

    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature:g}")
    source = _open_model(args)
    prompt = unescape(args.prompt)
    if not prompt:
        raise DataError("--prompt is empty")
    try:
        idx = source.tokenizer.encode(prompt)
    except DataError as e:
        raise DataError(f"--prompt: {e} (the tokenizer of {args.model})") from None
    streamer = TextStreamer(source.tokenizer, file=sys.stdout)  # each token as it comes
    vocab = source.tokenizer.vocab_size  # a padded vocabulary has ids no tokenizer can write
    try:
        # each new token is one row through every weight: a step of batch 1, as training chooses
        with step_threading(largest_product(source.model, 1), args.threads):
            source.model.generate(idx[None, :], args.max_new_tokens,
                                  temperature=args.temperature, top_k=args.top_k,
                                  rng=args.seed, streamer=streamer,
                                  vocab_size=min(vocab, source.model.config.vocab_size))
    except KeyboardInterrupt:  # keep what was printed, end the line; main says "interrupted"
        streamer.end()
        raise
    except NonFiniteError as e:
        streamer.end()
        raise NonFiniteError(f"{args.model}: {e}") from None
    return 0


def cmd_eval(args) -> int:
    from minilora.data import load_dataset
    from minilora.runtime import parallel
    from minilora.train.evaluate import estimate_loss, task_accuracy
    from minilora.train.runs import DATA_SEED

    source = _open_model(args)
    model, tokenizer = source.model, source.tokenizer
    block_size = _eval_block_size(args, source)
    data = load_dataset(args.data, tokenizer=tokenizer, seed=DATA_SEED)
    data.check_block_size(block_size)
    with parallel(args.threads):
        losses = estimate_loss(model, data, args.batch_size, args.eval_iters,
                               np.random.default_rng(args.seed), block_size)
        print(f"{args.data}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
              f"({args.eval_iters} batches of {args.batch_size} x {block_size} "
              "tokens per split)")
        if data.task is not None:
            score = task_accuracy(model, tokenizer, data.task)
            print(f"{data.task.name}: exact match {score.accuracy:.1%} "
                  f"({score.correct}/{score.total} held-out prompts, greedy)")
    return 0


def _eval_block_size(args, source: _Source) -> int:
    """eval's sequence length: --block-size, else the run's own (its TrainConfig.block_size),
    else the model's (a GPT's block_size; a Llama has none, so it is then an error)."""
    size = args.block_size
    if size is None and source.run is not None:
        size = source.run.meta.get("train_config", {}).get("block_size")
    with naming_fields(_as_flag):
        return architecture.of_model(source.model).block_size(source.model.config, size)


# float32 logits of a merged model differ from the unmerged ones by round-off (~1e-6 here);
# anything near these bounds means the merge is wrong, not inexact
_MERGE_TOLERANCE = {"float32": 1e-3, "float64": 1e-9}


@contextlib.contextmanager
def _new_output(out: Path, marker: str):
    """Make ``out`` for a model whose last file written is ``marker``; refuse one that holds such
    a model already. On any error, a directory this call made is removed again."""
    if (out / marker).exists():
        raise ConfigError(f"{out} already holds a model ({marker}); choose another --out")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield out
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _write_model(model, out: Path, fmt: str, tokenizer, info: dict) -> list[str]:
    """Write ``model`` (and its tokenizer) into ``out`` as a minilora run directory (``run``) or
    a Hugging Face one (``hf``), the file that marks it last; returns the names written."""
    from minilora import hf
    from minilora.io import RunLock, write_atomic_bytes
    from minilora.train import write_checkpoint
    from minilora.train.tokenizer_file import tokenizer_entry

    entry, files = tokenizer_entry(tokenizer) if tokenizer is not None else (None, {})
    for name, data in files.items():  # a BPE tokenizer: tokenizer.json, in both formats
        write_atomic_bytes(out / name, data)
    if fmt == "hf":
        hf.save_pretrained(model, out)
        return [*files, "config.json", "model.safetensors"]
    with RunLock(out):
        write_checkpoint(out / CHECKPOINT, model, {**info, "tokenizer": entry})
    return [*files, CHECKPOINT]


# float32 logits of a merged model differ from the unmerged ones by round-off (~1e-6 here);
# anything near these bounds means the merge is wrong, not inexact
_MERGE_TOLERANCE = {"float32": 1e-3, "float64": 1e-9}


def cmd_merge(args) -> int:
    from minilora.lora import merge_and_unload, named_lora_layers
    from minilora.lora.model import tied_lora_layers
    from minilora.tensor import no_grad

    source = _open_model(args, need_tokenizer=False)
    model, run = source.model, source.run
    fmt = args.format or ("run" if run is not None else "hf")
    if not any(True for _ in named_lora_layers(model)):
        raise ConfigError(f"merge: {args.model} is not a LoRA run (nothing to merge)"
                          if run is not None else
                          f"merge: {args.model} has no adapter; give one with --adapter DIR")
    out = Path(args.out)
    marker = CHECKPOINT if fmt == "run" else "config.json"
    if (out / marker).exists():  # before the merge, which costs time
        raise ConfigError(f"merge: {out} already holds a model ({marker}); choose another --out")
    tied = tied_lora_layers(model)
    if tied:
        raise ConfigError(f"merge: the adapter on {sorted(tied)} is on a weight tied to "
                          f"{sorted({o for others in tied.values() for o in others})}: merged, it "
                          "would change those too, so the merged model would not be the adapted "
                          "one (PEFT merges it that way); keep this adapter unmerged")
    probe = np.random.default_rng(0).integers(0, model.config.vocab_size,
                                              (4, architecture.of_model(model)
                                               .probe_length(model.config)))
    with no_grad():
        before = model(probe)[0].data
        merge_and_unload(model)
        after = model(probe)[0].data
    diff = float(np.max(np.abs(before.astype(np.float64) - after)))
    bound = _MERGE_TOLERANCE[model.config.dtype] * max(1.0, float(np.max(np.abs(before))))
    if not diff <= bound:
        raise MiniLoRAError(f"merge: merged and unmerged logits differ by {diff:.3g} (more than "
                            f"{bound:.3g}); nothing was written")
    info = {"merged_from": str(Path(args.adapter or args.model).resolve())}
    if run is not None and "data" in run.meta:
        info["data"] = run.meta["data"]
    with _new_output(out, marker):
        _write_model(model, out, fmt, source.tokenizer, info)
    where = out / CHECKPOINT if fmt == "run" else f"{out} (a Hugging Face directory)"
    print(f"merged {args.adapter or args.model} into {where}: a plain model with "
          f"{model.num_parameters():,} parameters; max |logits merged - unmerged| = {diff:.3g}")
    return 0


def cmd_export(args) -> int:
    from minilora import hf
    from minilora.hf.pretrained import architecture_of
    from minilora.train import load_run
    from minilora.train.sources import is_pretrained

    if is_pretrained(args.model):
        raise ConfigError(f"export: {args.model} is a Hugging Face model directory already "
                          "(export writes a minilora run as one)")
    run = load_run(args.model, base=args.base)
    out, lora = Path(args.out), run.meta["kind"] == "lora"
    if args.format == "hf":
        if lora:
            raise ConfigError(f"export --format hf: {args.model} is a LoRA run; write its adapter "
                              f"with --format peft, or the merged model with 'minilora merge "
                              f"--model {args.model} --out DIR --format hf'")
        with _new_output(out, "config.json"):
            written = _write_model(run.model, out, "hf", run.tokenizer, {})
        print(f"exported {args.model} to {out}: {', '.join(written)} (transformers: "
              f"{architecture_of(run.model, 'export').ARCHITECTURES[0]}.from_pretrained)")
        if "tokenizer.json" not in written:
            print(f"(its {run.tokenizer.kind if run.tokenizer else 'missing'} tokenizer has no "
                  "Hugging Face file: only a BPE tokenizer is written)")
        return 0
    if not lora:
        raise ConfigError(f"export --format peft: {args.model} is a full run, with no adapter; "
                          "--format hf writes its model")
    base_hf = is_pretrained(run.base_dir)
    with _new_output(out, "adapter_config.json"):
        hf.save_adapter(run.model, out,
                        base_model_name_or_path=str(run.base_dir) if base_hf else None)
    print(f"exported {args.model}'s adapter to {out}: adapter_config.json, "
          "adapter_model.safetensors (PEFT: PeftModel.from_pretrained on its base)")
    if not base_hf:
        print(f"(its base {run.base_dir} is a minilora run; PEFT needs it as a Hugging Face "
              f"directory: minilora export --model {run.base_dir} --out DIR --format hf)")
    return 0


def cmd_params(args) -> int:
    from minilora.lora import LoRALayerCount

    out_f, in_f = args.shape
    c = LoRALayerCount("W", in_f, out_f, args.rank, magnitude=args.use_dora)
    frac = c.fraction
    as_ratio = f"1/{frac.denominator}" if frac.numerator == 1 else f"{frac}"
    print(f"weight W: {out_f:,} x {in_f:,} = {c.weight_params:,} parameters")
    if args.use_dora:
        print(f"DoRA, rank {args.rank}: A ({args.rank} x {in_f:,}) + B ({out_f:,} x {args.rank}) "
              f"+ m ({out_f:,}) = {args.rank} x ({in_f:,} + {out_f:,}) + {out_f:,} = "
              f"{c.lora_params:,} trainable parameters")
    else:
        print(f"LoRA, rank {args.rank}: A ({args.rank} x {in_f:,}) + B ({out_f:,} x {args.rank}) "
              f"= {args.rank} x ({in_f:,} + {out_f:,}) = {c.lora_params:,} trainable parameters")
    print(f"ratio: {c.lora_params:,} / {c.weight_params:,} = {as_ratio} "
          f"({c.lora_params / c.weight_params:.4%})")
    if c.lora_params >= c.weight_params:
        print(f"(rank {args.rank} saves nothing here: LoRA is smaller than W only while "
              f"r < in x out / (in + out) = {in_f * out_f / (in_f + out_f):.4g})")
    return 0


def cmd_demo(args) -> int:
    from minilora.demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, quiet=args.quiet, threads=args.threads)
    return 0


def cmd_bench(args) -> int:
    from minilora.bench import main as bench_main
    from minilora.bench.references import torch_peer_path

    if args.json is not None:  # checked now, not after the minutes the benchmark takes
        path = Path(args.json)
        if path.is_dir():
            raise ConfigError(f"--json {path}: is a directory")
        if not path.parent.is_dir():
            raise ConfigError(f"--json {path}: the directory {path.parent} does not exist")
        if not os.access(path.parent, os.W_OK):
            raise ConfigError(f"--json {path}: cannot write in {path.parent}")
    if args.compare == "torch":
        peer, why = torch_peer_path()
        if peer is None:
            raise ConfigError(f"--compare torch: {why}")
    return bench_main(args)


def cmd_check(args) -> int:
    from minilora.check import check_logits, check_merge

    if args.merged is not None and any(getattr(args, k) is not None for k in
                                   ("input_ids", "computed_in", "tolerance")):
        raise ConfigError("check: --input-ids, --computed-in and --tolerance go with --logits")
    if args.merged is not None:
        report = check_merge(args.base, args.adapter, args.merged)
        print(f"{args.merged} against {args.base} + {args.adapter} merged in float64 "
              "(W' = W + s B A; bounds: docs/conformance.md)")
    else:
        report = check_logits(args.base, args.adapter, args.logits, args.input_ids,
                              args.computed_in, args.tolerance)
        print(f"{args.logits} against the forward of {args.base} + {args.adapter} in float64")
    print(report.render(args.all), end="")
    if args.json:
        report.save_json(args.json)
    return report.exit_code


def cmd_vectors(args) -> int:
    from minilora.check import VECTORS_VERSION, write_vectors

    out = write_vectors(args.out)
    print(f"golden vectors version {VECTORS_VERSION} written to {out} (manifest.json lists "
          "every case, its tolerances and each file's SHA-256)")
    return 0

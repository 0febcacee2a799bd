"""Benchmark config C (GPT-2 small's shape) and benchmarks/peak_memory.py: the config table, and
the machinery run on tiny models (no 124M model in the tests)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from minilora import bench, cli
from minilora.ops import backend

C = bench.CONFIGS["C"]
# C's vocabulary with a toy body: the fused lm_head's chunks meet a real 50,257-word vocabulary
TINY_C = dataclasses.replace(C, n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2)
PEAK_MEMORY = Path(__file__).resolve().parent.parent / "benchmarks" / "peak_memory.py"


def test_config_c_is_gpt2_small_at_block_256_and_batch_4():
    gpt = C.gpt()
    assert (gpt.n_layer, gpt.n_head, gpt.n_embd, gpt.vocab_size) == (12, 12, 768, 50257)
    assert (C.block_size, C.batch_size) == (256, 4)
    assert bench.LORA["r"] == 8 and bench.LORA["target_modules"] == ("c_attn", "c_proj")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_config_c_flops_equal_the_products_a_step_computes(lora):
    """With the vocabulary's products in row chunks, the count still matches the formula."""
    model, opt, x, y = bench.build(TINY_C, lora)
    bench.train_step(model, opt, x, y)
    with backend.record_products() as products:
        bench.train_step(model, opt, x, y)
    assert bench.product_flops(products) == bench.analytic_flops(TINY_C, lora)


def test_bench_runs_config_c_and_reports_it(monkeypatch):
    monkeypatch.setitem(bench.CONFIGS, "C", TINY_C)
    results = bench.run(("C",), steps=1, warmup=0, min_seconds=0)
    entry = results["configs"]["C"]
    assert entry["config"]["vocab_size"] == 50257
    assert entry["full"]["ms"] > 0 and entry["lora"]["ms"] > 0
    assert " C    full" in bench.report(results) and " C    lora" in bench.report(results)


def test_the_command_line_offers_config_c():
    args = cli.build_parser().parse_args(["bench", "--config", "C", "--compare", "torch"])
    assert args.config == ["C"]


def _peak_memory():
    spec = importlib.util.spec_from_file_location("peak_memory", PEAK_MEMORY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_memory_measures_each_side_in_a_child_of_its_own(tmp_path, capsys):
    """Config A, one step: every method's child reports a peak, from wait4 and from VmHWM."""
    sides = "minilora,torch" if importlib.util.find_spec("torch") else "minilora"
    out = tmp_path / "peak.json"
    assert _peak_memory().main(["--config", "A", "--steps", "1", "--sides", sides,
                                "--threads", "1", "--json", str(out)]) == 0
    import json

    results = json.loads(out.read_text())
    assert {(r["side"], r["method"]) for r in results} == {
        (s, m) for s in sides.split(",") for m in ("full", "lora", "lora+ckpt")}
    for r in results:
        # a high-water mark is at least every resident size before it; wait4's is the last one
        assert r["ru_maxrss_kib"] >= r["vmhwm_kib"] >= r["after_build_kib"] > 0
        assert r["after_imports_kib"] > 0 and r["step_s"] > 0
    assert "peak = ru_maxrss of each child from os.wait4" in capsys.readouterr().out


def test_bench_times_lora_with_activation_checkpointing_in_turn(monkeypatch):
    """--activation-checkpointing adds a row: more products (the blocks' forward again), fewer
    activations kept for backward."""
    monkeypatch.setitem(bench.CONFIGS, "C", TINY_C)
    results = bench.run(("C",), steps=1, warmup=0, min_seconds=0, checkpointing=True)
    lora, ckpt = results["configs"]["C"]["lora"], results["configs"]["C"]["lora+ckpt"]
    assert ckpt["flops"] > lora["flops"]
    assert ckpt["memory"]["activations"] < lora["memory"]["activations"]
    assert "LoRA with activation checkpointing / LoRA" in bench.report(results)
    args = cli.build_parser().parse_args(["bench", "--config", "C", "--activation-checkpointing"])
    assert args.activation_checkpointing

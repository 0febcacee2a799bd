"""The benchmark: its FLOP count equals the products the engine really computes, and it runs."""

import dataclasses
import subprocess
import sys

import pytest

from minilora import bench
from minilora.errors import BenchmarkError
from minilora.ops import backend
from tests.extras import need

SMALL = {"A": dataclasses.replace(bench.CONFIGS["A"], n_layer=2, batch_size=2, block_size=16),
         "B": dataclasses.replace(bench.CONFIGS["B"], n_layer=2, batch_size=1)}  # T=256: row blocks


@pytest.mark.parametrize("name", ["A", "B"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_analytic_flops_equal_the_products_a_step_computes(name, lora):
    """The formula (no dW for frozen weights, the adapters' own products, no dX into layer 0's
    c_attn under LoRA) must count exactly what the engine runs, product by product."""
    model, opt, x, y = bench.build(SMALL[name], lora)
    bench.train_step(model, opt, x, y)
    with backend.record_products() as products:
        bench.train_step(model, opt, x, y)
    assert bench.product_flops(products) == bench.analytic_flops(SMALL[name], lora)


def test_lora_step_skips_every_frozen_weight_gradient():
    cfg = SMALL["A"]
    full = bench.analytic_flops(cfg, lora=False)
    lora = bench.analytic_flops(cfg, lora=True)
    assert 0.6 < lora / full < 0.75  # matmul FLOPs alone: about 2/3 of full fine-tuning


def test_product_flops_counts_batched_products():
    assert bench.product_flops([((2, 3, 4, 5), (2, 3, 5, 6))]) == 2 * 6 * 4 * 5 * 6
    assert bench.product_flops([((7, 5), (5, 6)), ((1, 7, 5), (3, 5, 6))]) == 2 * 7 * 5 * 6 * 4


def test_bench_command_runs_and_prints_its_tables():
    args = ["bench", "--config", "A", "--steps", "2", "--warmup", "1", "--min-seconds", "0"]
    out = subprocess.run([sys.executable, "-m", "minilora.cli", *args], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    assert "of numpy peak" in out and "LoRA / full" in out and "optimizer state" in out
    assert " A    full" in out and " A    lora" in out
    assert "products threaded by: config A BLAS (largest 50M multiply-adds)" in out  # A is small


def test_the_torch_peer_steps_in_alternation_with_minilora():
    need("torch")
    results = bench.run(("A",), steps=2, warmup=1, compare="torch", min_seconds=0)
    entry = results["configs"]["A"]
    assert entry["full"]["torch_ms"] > 0 and entry["lora"]["torch_ms"] > 0
    assert "minilora/torch" in bench.report(results)


def test_a_peer_that_dies_is_a_clear_error(tmp_path):
    dead = tmp_path / "peer.py"
    dead.write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(BenchmarkError, match=r"peer\.py.*exit code 3"):
        bench.TorchPeer(dead, bench.CONFIGS["A"], warmup=0, threads=1)

"""Non-finite numbers: a NaN or infinity in the loss or a gradient stops training with an error that
names the iteration and the first parameter affected, and the last good checkpoint stays as it was;
``on_nonfinite="skip"`` skips such steps instead and counts them, across resume too.

The faults are injected by FaultyGPT, a GPT whose training forward pass, at chosen iterations, adds
to the loss a term that is 0 but whose gradient puts a NaN or an infinity into one parameter (or
writes a NaN into a parameter's values). The fused kernels' own finiteness for logits of +-1e4 in
float32 is tested in tests/ops/test_fused.py; layer norm on constant rows is tested here.
"""

from __future__ import annotations

import numpy as np
import pytest

from minilora import NonFiniteError, Tensor, ops
from minilora.data import TextDataset
from minilora.models import GPT, GPTConfig
from minilora.train import TrainConfig, read_checkpoint, train
from tests.reliability import crash

VICTIM = "transformer.h.0.mlp.c_fc.weight"


class Crash(Exception):
    """A simulated crash in the middle of a run."""


class FaultyGPT(GPT):
    """GPT whose training step ``it`` (counted from ``first_iter``) can go wrong on purpose.

    grad_faults: {it: [(parameter name, np.nan or np.inf), ...]}: those gradients get them.
    value_faults: {it: parameter name}: that parameter's first value becomes NaN before the step.
    crash_at: the step at which the forward pass raises Crash.
    """

    def __init__(self, config, seed, grad_faults=None, value_faults=None, crash_at=None,
                 first_iter=0, on_fault=None):
        super().__init__(config, seed)
        self.grad_faults, self.value_faults = grad_faults or {}, value_faults or {}
        self.crash_at, self.it, self.on_fault = crash_at, first_iter, on_fault

    def forward(self, idx, targets=None, **kwargs):
        if not (self.training and targets is not None):
            return super().forward(idx, targets, **kwargs)
        it, self.it = self.it, self.it + 1
        if it == self.crash_at:
            raise Crash(f"crash at iteration {it}")
        params = dict(self.named_parameters())
        if it in self.value_faults:
            params[self.value_faults[it]].data.reshape(-1)[0] = np.nan
        logits, loss = super().forward(idx, targets, **kwargs)
        for name, bad in self.grad_faults.get(it, ()):
            loss = loss + poison(params[name], bad)
        if self.on_fault is not None and (it in self.grad_faults or it in self.value_faults):
            self.on_fault(it)
        return logits, loss


def poison(p: Tensor, bad: float) -> Tensor:
    """0 (so the loss is unchanged), with a gradient of ``bad`` in p's first element."""
    def backward(g):
        grad = np.zeros_like(p.data)
        grad.reshape(-1)[0] = bad
        return (grad,)

    return Tensor.from_op(np.zeros((), p.dtype), (p,), backward)


CONFIG = dict(batch_size=4, max_iters=12, eval_interval=4, eval_iters=1, warmup_iters=2, seed=5)


@pytest.fixture(scope="module")
def data():
    return TextDataset(crash.corpus_text(), name="corpus")


def model(data, **faults) -> FaultyGPT:
    cfg = GPTConfig(vocab_size=data.tokenizer.vocab_size, **{**crash.MODEL, "dropout": 0.0})
    return FaultyGPT(cfg, seed=1, **faults)


def watch_checkpoint(out):
    """An on_fault hook that records the checkpoint's bytes at the moment the fault happens."""
    seen = {}

    def on_fault(it):
        seen[it] = (out / "checkpoint.safetensors").read_bytes()
    return seen, on_fault


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_a_non_finite_gradient_stops_training_naming_the_step_and_the_parameter(data, tmp_path,
                                                                               bad):
    out = tmp_path / "run"
    seen, on_fault = watch_checkpoint(out)
    m = model(data, grad_faults={6: [(VICTIM, bad)]}, on_fault=on_fault)
    with pytest.raises(NonFiniteError) as e:
        train(m, data, TrainConfig(**CONFIG), out, quiet=True, threads=1)
    message = str(e.value)
    assert "iteration 6" in message and VICTIM in message and "gradient" in message
    assert str(out) in message  # where the last good checkpoint is
    assert (out / "checkpoint.safetensors").read_bytes() == seen[6]  # unchanged since the fault
    assert read_checkpoint(out).meta["iter"] == 4
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.safetensors", "metrics.jsonl"]


def test_a_nan_loss_names_the_parameter_that_holds_the_nan(data, tmp_path):
    out = tmp_path / "run"
    seen, on_fault = watch_checkpoint(out)
    m = model(data, value_faults={9: VICTIM}, on_fault=on_fault)
    with pytest.raises(NonFiniteError, match=rf"iteration 9: the loss is nan; parameter {VICTIM} "
                                             "holds NaN"):
        train(m, data, TrainConfig(**CONFIG), out, quiet=True, threads=1)
    assert (out / "checkpoint.safetensors").read_bytes() == seen[9]


def test_the_parameter_named_is_the_first_affected_in_model_order(data):
    earlier = "transformer.wpe.weight"  # before the blocks in model order
    m = model(data, grad_faults={2: [(VICTIM, np.nan), (earlier, np.inf)]})
    with pytest.raises(NonFiniteError, match=f"iteration 2: .* first parameter affected is "
                                             f"{earlier} "):
        train(m, data, TrainConfig(**CONFIG), quiet=True, threads=1)


def test_skipping_non_finite_steps_counts_them_and_leaves_the_weights_alone(data, tmp_path):
    m = model(data, grad_faults={3: [(VICTIM, np.nan)], 7: [(VICTIM, np.inf)]})
    before_after = {}
    real_forward = m.forward

    def forward(idx, targets=None, **kwargs):  # the weights as steps 3 and 4 begin
        if m.training and targets is not None and m.it in (3, 4):
            before_after[m.it] = {k: v.copy() for k, v in m.state_dict().items()}
        return real_forward(idx, targets, **kwargs)
    m.forward = forward
    result = train(m, data, TrainConfig(**CONFIG, on_nonfinite="skip"), tmp_path / "run",
                   quiet=True, threads=1)
    assert result.skipped_steps == 2
    assert read_checkpoint(tmp_path / "run").meta["skipped_steps"] == 2
    step_3 = before_after[3], before_after[4]
    assert all(np.array_equal(step_3[0][k], step_3[1][k]) for k in step_3[0])  # no update
    assert all(np.isfinite(p.data).all() for p in m.parameters())


def test_skipped_steps_are_counted_across_resume_and_resume_stays_bit_identical(data, tmp_path):
    faults = {3: [(VICTIM, np.nan)], 7: [(VICTIM, np.inf)]}
    config = TrainConfig(**CONFIG, on_nonfinite="skip")
    whole = train(model(data, grad_faults=faults), data, config, tmp_path / "whole", quiet=True,
                  threads=1)
    with pytest.raises(Crash):  # after the checkpoint of iteration 4, one step skipped so far
        train(model(data, grad_faults=faults, crash_at=6), data, config, tmp_path / "cut",
              quiet=True, threads=1)
    assert read_checkpoint(tmp_path / "cut").meta["skipped_steps"] == 1
    resumed = train(model(data, grad_faults=faults, first_iter=4), data, config, tmp_path / "cut",
                    resume=True, quiet=True, threads=1)
    assert resumed.skipped_steps == whole.skipped_steps == 2
    a, b = read_checkpoint(tmp_path / "whole"), read_checkpoint(tmp_path / "cut")
    assert all(np.array_equal(a.weights[k], b.weights[k]) for k in a.weights)


def test_a_non_finite_evaluation_writes_no_checkpoint_and_no_metrics(data, tmp_path):
    out = tmp_path / "run"
    m = model(data)
    real_forward = m.forward

    def forward(idx, targets=None, **kwargs):  # the evaluation at iteration 8 sees a NaN loss
        result = real_forward(idx, targets, **kwargs)
        if targets is not None and not m.training and m.it == 8:
            return result[0], result[1] * np.nan
        return result
    m.forward = forward
    with pytest.raises(NonFiniteError, match="iteration 8: the evaluation loss is nan"):
        train(m, data, TrainConfig(**CONFIG), out, quiet=True, threads=1)
    assert read_checkpoint(out).meta["iter"] == 4
    assert (out / "metrics.jsonl").read_text().count("\n") == 2  # iterations 0 and 4


# ---- the kernels stay finite -------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 7)])
def test_layer_norm_is_finite_on_constant_rows_in_value_and_gradient(shape):
    """A constant row has variance 0: (x - mean) / sqrt(0 + eps) must stay 0, not 0/0."""
    for dtype in (np.float32, np.float64):
        x = Tensor(np.full(shape, 3.25, dtype), requires_grad=True)
        w = Tensor(np.linspace(0.5, 1.5, shape[-1]).astype(dtype), requires_grad=True)
        b = Tensor(np.linspace(-1, 1, shape[-1]).astype(dtype), requires_grad=True)
        y = ops.layer_norm(x, w, b)
        (y * Tensor(np.ones(shape, dtype))).sum().backward()
        assert y.dtype == dtype and np.array_equal(y.data, np.broadcast_to(b.data, shape))
        assert all(np.isfinite(t.grad).all() for t in (x, w, b))


def test_softmax_cross_entropy_gradients_stay_finite_for_huge_float32_logits():
    """The values are tested in tests/ops/test_fused.py; here the gradients too."""
    x = Tensor(np.array([[1e4, -1e4, 1e4 - 3.0], [-1e4, -1e4 + 1.0, -1e4 + 2.0]], np.float32),
               requires_grad=True)
    w = Tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
    for op in (lambda t: (ops.softmax(t) * w).sum(), lambda t: (ops.log_softmax(t) * w).sum(),
               lambda t: ops.cross_entropy(t, np.array([2, 0]))):
        x.grad = None
        out = op(x)
        out.backward()
        assert np.isfinite(out.item()) and np.isfinite(x.grad).all() and x.grad.dtype == np.float32

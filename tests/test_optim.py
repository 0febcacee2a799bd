"""Optimizers, schedule and clipping: hand-computed updates, frozen parameters, resumable state."""

import itertools
import json
import math
import re

import numpy as np
import pytest

from minilora import ConfigError, StateDictError
from minilora.io import load_tensors, save_tensors
from minilora.nn import Parameter
from minilora.optim import (
    SGD,
    AdamW,
    CosineSchedule,
    clip_grad_norm,
    cosine_lr,
    param_groups,
)
from tests.extras import need


def make_params(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [("w", Parameter(rng.standard_normal((3, 4)).astype(dtype))),
            ("b", Parameter(rng.standard_normal(4).astype(dtype)))]


def set_grads(named, step, seed=100):
    rng = np.random.default_rng(seed + step)
    for _, p in named:
        p.grad = rng.standard_normal(p.shape).astype(p.dtype)


def reference_adamw(p, grads, lr, betas, eps, wd):
    """Loshchilov & Hutter's AdamW in float64, written from the paper's equations."""
    p, m, v = p.astype(np.float64), 0.0, 0.0
    for t, g in enumerate(grads, 1):
        p = p - lr * wd * p
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


# ---- AdamW --------------------------------------------------------------------------------
def test_adamw_first_step_is_decay_then_lr_times_sign_of_grad():
    p = Parameter(np.ones((2, 2), np.float32))
    p.grad = np.full((2, 2), 0.5, np.float32)
    AdamW([p], lr=0.1, weight_decay=0.1).step()
    # 1 * (1 - 0.1 * 0.1) - 0.1 * m_hat / sqrt(v_hat) = 0.99 - 0.1 * 0.5 / 0.5 = 0.89
    np.testing.assert_allclose(p.data, 0.89, rtol=1e-6)


def test_adamw_matches_the_papers_equations_over_several_steps():
    named = make_params(dtype=np.float64)
    start = {n: p.data.copy() for n, p in named}
    grads = {n: [] for n, _ in named}
    opt = AdamW(named, lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.2)
    for step in range(6):
        set_grads(named, step)
        for n, p in named:
            grads[n].append(p.grad.copy())
        opt.step()
    for n, p in named:
        want = reference_adamw(start[n], grads[n], 0.05, (0.8, 0.95), 1e-6, 0.2)
        np.testing.assert_allclose(p.data, want, rtol=1e-12, atol=1e-14)


def whole_array_adamw_step(p, g, m, v, t, lr, betas, eps, wd):
    """One float32 step of AdamW's docstring equations on whole arrays, in plain NumPy."""
    p = p * np.float32(1.0 - lr * wd)
    m = m + (1.0 - betas[0]) * (g - m)
    v = v * betas[1] + (1.0 - betas[1]) * g * g
    denom = np.sqrt(v) / (1.0 - betas[1] ** t) ** 0.5 + eps
    return p + (-(lr / (1.0 - betas[0] ** t)) * m) / denom, m, v


def test_adamw_in_place_blocks_round_as_the_whole_array_equations_on_any_threads():
    from minilora import runtime

    rng = np.random.default_rng(3)
    n = 5 * (1 << 17) + 7  # several blocks of the in-place update, a short last one
    start = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    want, m, v = start.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
    for t, g in enumerate(grads, 1):
        want, m, v = whole_array_adamw_step(want, g, m, v, t, 1e-2, (0.9, 0.99), 1e-8, 0.1)
    for threads in (1, 2):
        p = Parameter(start.copy())
        opt = AdamW([p], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
        with runtime.parallel(threads):
            for g in grads:
                p.grad = g
                opt.step()
        np.testing.assert_array_equal(p.data, want)
        np.testing.assert_array_equal(next(iter(opt.state.values()))["exp_avg_sq"], v)


def test_adamw_in_float32_stays_float32_and_close_to_float64():
    named = make_params()
    start = {n: p.data.copy() for n, p in named}
    opt, grads = AdamW(named, lr=0.01), {n: [] for n, _ in named}
    for step in range(4):
        set_grads(named, step)
        for n, p in named:
            grads[n].append(p.grad.astype(np.float64))
        opt.step()
    for n, p in named:
        assert p.dtype == np.float32
        assert all(a.dtype == np.float32 for k, a in opt.state[n].items() if k != "step")
        want = reference_adamw(start[n], grads[n], 0.01, (0.9, 0.999), 1e-8, 0.01)
        np.testing.assert_allclose(p.data, want, rtol=1e-5, atol=1e-6)  # float32 round-off


@pytest.mark.parametrize("make", [lambda ps: AdamW(ps, lr=0.1, weight_decay=0.1),
                                  lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1)])
def test_numpy_float64_hyperparameters_compute_like_python_floats(make):
    a, b = make_params(), make_params()
    opt_a, opt_b = make(a), make(b)
    opt_b.param_groups[0]["lr"] = np.float64(0.1)  # as a schedule computed with numpy might set it
    opt_b.param_groups[0]["weight_decay"] = np.float64(0.1)
    for step in range(3):
        set_grads(a, step)
        set_grads(b, step)
        opt_a.step()
        opt_b.step()
    for (_, pa), (_, pb) in zip(a, b, strict=True):
        assert pb.dtype == np.float32
        np.testing.assert_array_equal(pa.data, pb.data)  # no float64 round-off crept in


# ---- SGD ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("nesterov", "want"), [(False, [0.9, 0.71, 0.439]),
                                               (True, [0.81, 0.539, 0.1951])])
def test_sgd_momentum_matches_hand_computation(nesterov, want):
    # g = 1 every step, lr 0.1, momentum 0.9: buf = 1, 1.9, 2.71;
    # plain: p -= 0.1 buf; nesterov: p -= 0.1 (g + 0.9 buf)
    p = Parameter(np.ones(1, np.float64))
    opt = SGD([p], lr=0.1, momentum=0.9, nesterov=nesterov)
    for w in want:
        p.grad = np.ones(1)
        opt.step()
        np.testing.assert_allclose(p.data, [w], rtol=1e-12)


def test_sgd_weight_decay_is_added_to_the_gradient():
    p = Parameter(np.full(2, 2.0))
    p.grad = np.full(2, 1.0)
    SGD([p], lr=0.1, weight_decay=0.5).step()
    np.testing.assert_allclose(p.data, 2.0 - 0.1 * (1.0 + 0.5 * 2.0))


# ---- torch parity (optional) --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["adamw", "sgd", "nesterov"])
def test_matches_torch_optim(kind):
    (torch,) = need("torch")
    named = make_params()
    tparams = [torch.nn.Parameter(torch.tensor(p.data.copy())) for _, p in named]
    if kind == "adamw":
        ours = AdamW(named, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
        theirs = torch.optim.AdamW(tparams, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1,
                                   foreach=False)
    else:
        ours = SGD(named, lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=kind == "nesterov")
        theirs = torch.optim.SGD(tparams, lr=0.05, momentum=0.9, weight_decay=0.01,
                                 nesterov=kind == "nesterov", foreach=False)
    for step in range(5):
        set_grads(named, step)
        for (_, p), tp in zip(named, tparams, strict=True):
            tp.grad = torch.tensor(p.grad.copy())
        ours.step()
        theirs.step()
    for (_, p), tp in zip(named, tparams, strict=True):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-6, atol=1e-7)


# ---- frozen parameters and missing gradients ----------------------------------------------
@pytest.mark.parametrize("make", [
    lambda ps: AdamW(ps, lr=0.1, weight_decay=0.5),
    lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.5),
])
def test_frozen_parameters_are_bit_identical_and_have_no_state(make):
    frozen = Parameter(np.random.default_rng(1).standard_normal((3, 3)).astype(np.float32),
                       requires_grad=False)
    trained = Parameter(np.ones((3, 3), np.float32))
    before = frozen.data.copy()
    opt = make([("frozen", frozen), ("trained", trained)])
    for _ in range(5):
        frozen.grad = np.ones((3, 3), np.float32)  # even a stray gradient must not move it
        trained.grad = np.ones((3, 3), np.float32)
        opt.step()
    np.testing.assert_array_equal(frozen.data, before)
    assert "frozen" not in opt.state and "trained" in opt.state
    assert not any(k.startswith("frozen.") for k in opt.state_dict()["arrays"])


OPTIMIZERS = [
    lambda ps: AdamW(ps, lr=0.1, weight_decay=0.5),
    lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.5),
    lambda ps: SGD(ps, lr=0.1, momentum=0.9),
]


@pytest.mark.parametrize("make", OPTIMIZERS, ids=["adamw", "sgd-decay", "sgd"])
def test_read_only_and_strided_parameters_step_like_any_other(make):
    """A parameter whose array is read-only (loaded from a file's buffer) or a strided view (a
    transpose) takes the same steps as a plain one: the optimizer updates its own copy."""
    rng = np.random.default_rng(2)
    values, grads = rng.standard_normal((3, 4)), rng.standard_normal((3, 3, 4))
    read_only = values.copy()
    read_only.flags.writeable = False
    params = {"plain": Parameter(values.copy()), "read_only": Parameter(read_only),
              "strided": Parameter(np.ascontiguousarray(values.T).T)}
    assert not params["strided"].data.flags.c_contiguous
    opt = make(list(params.items()))
    for g in grads:
        for p in params.values():
            p.grad = g.copy()
        opt.step()
    for name in ("read_only", "strided"):
        np.testing.assert_array_equal(params[name].data, params["plain"].data, err_msg=name)
    assert not np.array_equal(params["plain"].data, values)


@pytest.mark.parametrize("make", OPTIMIZERS, ids=["adamw", "sgd-decay", "sgd"])
def test_a_step_never_writes_into_the_gradient(make):
    """The gradient is the caller's (clipping and logging read it): momentum buffers and the
    update are the optimizer's own arrays, step after step."""
    p = Parameter(np.ones((2, 3)))
    p.grad = np.arange(6.0).reshape(2, 3)
    opt = make([("p", p)])
    for _ in range(3):
        opt.step()
        np.testing.assert_array_equal(p.grad, np.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("make", OPTIMIZERS, ids=["adamw", "sgd-decay", "sgd"])
def test_a_float64_gradient_on_a_float32_parameter_is_cast_first(make):
    """The step is the float32 step, bit for bit: the gradient is cast before any arithmetic."""
    rng = np.random.default_rng(3)
    values, grads = rng.standard_normal((2, 5)).astype(np.float32), rng.standard_normal((2, 2, 5))
    wide, narrow = Parameter(values.copy()), Parameter(values.copy())
    opt_wide, opt_narrow = make([("p", wide)]), make([("p", narrow)])
    for g in grads:
        wide.grad, narrow.grad = g.copy(), g.astype(np.float32)
        opt_wide.step()
        opt_narrow.step()
    assert wide.dtype == np.float32
    np.testing.assert_array_equal(wide.data, narrow.data)


def test_parameter_without_grad_is_skipped_that_step():
    a, b = Parameter(np.ones(2, np.float32)), Parameter(np.ones(2, np.float32))
    opt = AdamW([a, b], lr=0.1, weight_decay=0.5)
    a.grad = np.ones(2, np.float32)
    opt.step()
    np.testing.assert_array_equal(b.data, np.ones(2, np.float32))  # not even decayed
    assert list(opt.state) == ["0"]


def test_zero_grad_sets_grads_to_none():
    named = make_params()
    set_grads(named, 0)
    opt = SGD(named, lr=0.1)
    opt.zero_grad()
    assert all(p.grad is None for _, p in named)


# ---- parameter groups ---------------------------------------------------------------------
def test_param_groups_decays_only_weights_with_two_or_more_dims():
    named = [("wte.weight", Parameter(np.ones((5, 4)))), ("ln.weight", Parameter(np.ones(4))),
             ("c_fc.bias", Parameter(np.ones(4))), ("lora_A", Parameter(np.ones((2, 4)))),
             ("frozen.weight", Parameter(np.ones((4, 4)), requires_grad=False))]
    groups = param_groups(named, 0.1)
    decayed = {n for n, _ in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and decayed == {"wte.weight", "lora_A"}
    assert groups[1]["weight_decay"] == 0.0
    assert {n for n, _ in groups[1]["params"]} == {"ln.weight", "c_fc.bias"}


def test_one_dimensional_parameters_are_not_decayed_by_param_groups():
    named = [("w", Parameter(np.ones((2, 2)))), ("b", Parameter(np.ones(2)))]
    opt = AdamW(param_groups(named, weight_decay=0.5), lr=0.1)
    for _, p in named:
        p.grad = np.zeros(p.shape)  # zero gradient: any change comes from weight decay
    opt.step()
    np.testing.assert_allclose(named[0][1].data, 1.0 - 0.1 * 0.5)
    np.testing.assert_array_equal(named[1][1].data, 1.0)


def test_each_group_uses_its_own_lr():
    a, b = Parameter(np.zeros(1)), Parameter(np.zeros(1))
    opt = SGD([{"params": [a], "lr": 1.0}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = np.ones(1), np.ones(1)
    opt.step()
    assert a.data[0] == -1.0 and b.data[0] == pytest.approx(-0.1)


def test_set_lr_keeps_each_groups_ratio_to_the_optimizers_lr():
    """A schedule scales every group's rate as torch's schedulers do: LoRA+'s B group stays
    ``loraplus_lr_ratio`` times A's (here 10x), and a group at the default follows it."""
    a, b = Parameter(np.zeros(1)), Parameter(np.zeros(1))
    opt = SGD([{"params": [a], "lr": 1.0}, {"params": [b]}], lr=0.1)
    for lr in (0.5, 0.25, 0.0):
        opt.set_lr(lr)
        assert [g["lr"] for g in opt.param_groups] == [pytest.approx(10 * lr), lr]


def test_set_lr_refuses_a_group_rate_that_is_no_multiple_of_lr_zero():
    a, b = Parameter(np.zeros(1)), Parameter(np.zeros(1))
    opt = SGD([{"params": [a], "lr": 1.0}, {"params": [b]}], lr=0.0)
    with pytest.raises(ConfigError, match="group 0 has its own lr"):
        opt.set_lr(0.5)


@pytest.mark.parametrize(("make", "field"), [
    (lambda ps: AdamW(ps, lr=-1.0), "lr"),
    (lambda ps: AdamW(ps, betas=(0.9, 1.0)), "betas"),
    (lambda ps: AdamW(ps, eps=float("nan")), "eps"),
    (lambda ps: SGD(ps, lr=0.1, nesterov=True), "nesterov"),
    (lambda ps: SGD(ps, lr="0.1"), "lr"),
    (lambda ps: SGD([{"params": ps, "learning_rate": 0.1}], lr=0.1), "learning_rate"),
    (lambda ps: SGD([], lr=0.1), "no parameters"),
    (lambda ps: SGD(ps + ps, lr=0.1), "more than one place"),
    (lambda ps: SGD([("a", ps[0]), ps[1]], lr=0.1), "name"),
])
def test_bad_settings_are_config_errors_naming_the_field(make, field):
    ps = [Parameter(np.ones(2)), Parameter(np.ones(2))]
    with pytest.raises(ConfigError, match=field):
        make(ps)


# ---- state dicts ----------------------------------------------------------------------------
def run(opt_factory, named, steps, start=0):
    opt = opt_factory(named)
    for step in range(start, start + steps):
        set_grads(named, step)
        opt.step()
    return opt


@pytest.mark.parametrize("factory", [
    lambda ps: AdamW(param_groups(ps, 0.1), lr=0.01),
    lambda ps: SGD(ps, lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.01),
])
def test_state_dict_round_trip_continues_bit_identically(factory, tmp_path):
    straight = make_params()
    run(factory, straight, 8)

    first = make_params()
    opt = run(factory, first, 4)
    state = opt.state_dict()
    save_tensors(tmp_path / "optim.safetensors", state["arrays"])
    (tmp_path / "optim.json").write_text(json.dumps(state["meta"]))

    resumed = [(n, Parameter(p.data.copy())) for n, p in first]  # a fresh process, in effect
    opt2 = factory(resumed)
    opt2.load_state_dict({"meta": json.loads((tmp_path / "optim.json").read_text()),
                          "arrays": load_tensors(tmp_path / "optim.safetensors")})
    for step in range(4, 8):
        set_grads(resumed, step)
        opt2.step()
    for (_, a), (_, b) in zip(straight, resumed, strict=True):
        np.testing.assert_array_equal(a.data, b.data)


def test_state_dict_is_keyed_by_parameter_name():
    named = make_params()
    opt = run(lambda ps: AdamW(ps, lr=0.1), named, 2)
    state = opt.state_dict()
    assert set(state["arrays"]) == {"w.exp_avg", "w.exp_avg_sq", "b.exp_avg", "b.exp_avg_sq"}
    assert state["meta"]["state"] == {"w": {"step": 2}, "b": {"step": 2}}
    json.dumps(state["meta"])  # JSON-able as it is


def damaged(state, how):
    meta, arrays = json.loads(json.dumps(state["meta"])), dict(state["arrays"])
    if how == "type":
        meta["type"] = "SGD"
    elif how == "shape":
        arrays["w.exp_avg"] = np.zeros((4, 3), np.float32)
    elif how == "dtype":
        arrays["w.exp_avg"] = arrays["w.exp_avg"].astype(np.float64)
    elif how == "missing":
        del arrays["b.exp_avg_sq"]
    elif how == "unknown":
        meta["state"]["nope"] = {"step": 1}
    elif how == "nan":
        arrays["w.exp_avg"] = np.full((3, 4), np.nan, np.float32)
    elif how == "negative_v":
        arrays["w.exp_avg_sq"] = -np.ones((3, 4), np.float32)
    elif how == "step":
        meta["state"]["w"]["step"] = "2"
    elif how == "lr":
        meta["param_groups"][0]["lr"] = -1
    elif how == "groups":
        meta["param_groups"] = []
    return {"meta": meta, "arrays": arrays}


# what each damage is called in the error, after "AdamW.load_state_dict: "
DAMAGE_MESSAGES = {
    "type": "expected format 'minilora.optim/1' of type 'AdamW', got 'minilora.optim/1' of "
            "type 'SGD'",
    "shape": "array 'w.exp_avg' must be (3, 4) float32, got ((4, 3), 'float32')",
    "dtype": "array 'w.exp_avg' must be (3, 4) float32, got ((3, 4), 'float64')",
    "missing": "parameter 'b' lacks state arrays ['exp_avg_sq']",
    "unknown": "state for unknown parameter 'nope'",
    "nan": "array 'w.exp_avg' holds non-finite or invalid values",
    "negative_v": "array 'w.exp_avg_sq' holds non-finite or invalid values",
    "step": "step of 'w' must be a positive integer, got '2'",
    "lr": "group 0: lr must be",
    "groups": "expected 1 parameter groups, got 0",
}


@pytest.mark.parametrize("how", list(DAMAGE_MESSAGES))
def test_load_state_dict_refuses_a_mismatch_and_changes_nothing(how):
    named = make_params()
    state = run(lambda ps: AdamW(ps, lr=0.1), named, 2).state_dict()
    opt = run(lambda ps: AdamW(ps, lr=0.1), make_params(), 1)
    before = opt.state_dict()
    message = re.escape(f"AdamW.load_state_dict: {DAMAGE_MESSAGES[how]}")
    with pytest.raises(StateDictError, match=f"^{message}"):
        opt.load_state_dict(damaged(state, how))
    after = opt.state_dict()
    assert after["meta"] == before["meta"]
    for k in before["arrays"]:
        np.testing.assert_array_equal(after["arrays"][k], before["arrays"][k])


def test_sgd_needs_its_momentum_buffer_only_with_momentum():
    with_momentum = run(lambda ps: SGD(ps, lr=0.1, momentum=0.9), make_params(), 2).state_dict()
    del with_momentum["arrays"]["w.momentum_buffer"]
    with pytest.raises(StateDictError, match=re.escape(
            "SGD.load_state_dict: parameter 'w' lacks state arrays ['momentum_buffer']")):
        SGD(make_params(), lr=0.1, momentum=0.9).load_state_dict(with_momentum)
    plain = run(lambda ps: SGD(ps, lr=0.1), make_params(), 2).state_dict()
    assert plain["arrays"] == {}
    SGD(make_params(), lr=0.1).load_state_dict(plain)  # nothing to lack


def test_load_state_dict_refuses_state_for_a_frozen_parameter():
    state = run(lambda ps: AdamW(ps, lr=0.1), make_params(), 1).state_dict()
    named = make_params()
    named[0][1].requires_grad_(False)
    with pytest.raises(StateDictError, match="does not require grad"):
        AdamW(named, lr=0.1).load_state_dict(state)


# ---- schedule -------------------------------------------------------------------------------
def test_cosine_schedule_at_the_warmup_and_decay_boundaries():
    s = CosineSchedule(lr=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    assert s(0) == pytest.approx(1 / 11)  # nanoGPT: lr * (it + 1) / (warmup + 1)
    assert s(9) == pytest.approx(10 / 11)
    assert s(10) == 1.0  # decay starts at the full rate
    assert s(60) == pytest.approx(0.55)  # half way: (lr + min_lr) / 2
    assert s(110) == 0.1 and s(111) == 0.1 and s(10_000) == 0.1
    values = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))  # monotone decay


def test_cosine_schedule_without_decay_phase_gives_min_lr_after_warmup():
    assert cosine_lr(5, 1.0, 0.5, warmup_iters=5, lr_decay_iters=5) == 0.5
    assert cosine_lr(0, 1.0, 0.5, warmup_iters=0, lr_decay_iters=0) == 0.5


@pytest.mark.parametrize("kwargs", [
    {"lr": -1.0}, {"min_lr": 2.0}, {"warmup_iters": -1}, {"lr_decay_iters": 5}, {"it": 1.5},
])
def test_cosine_schedule_refuses_nonsense(kwargs):
    args = {"it": 0, "lr": 1.0, "min_lr": 0.1, "warmup_iters": 10, "lr_decay_iters": 100, **kwargs}
    with pytest.raises(ConfigError):
        cosine_lr(**args)


# ---- gradient clipping ----------------------------------------------------------------------
def test_clip_grad_norm_scales_to_max_norm_and_returns_the_old_norm():
    a, b = Parameter(np.zeros(2, np.float32)), Parameter(np.zeros(1, np.float32))
    a.grad, b.grad = np.array([3.0, 0.0], np.float32), np.array([4.0], np.float32)
    norm = clip_grad_norm([a, b], max_norm=1.0)
    assert norm == pytest.approx(5.0)
    assert a.grad.dtype == np.float32
    total = math.sqrt(float((a.grad.astype(np.float64) ** 2).sum() + b.grad[0] ** 2))
    assert total == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(a.grad, [0.6, 0.0], rtol=1e-5)


def test_clip_grad_norm_leaves_small_gradients_alone():
    a = Parameter(np.zeros(2, np.float32))
    a.grad = np.array([0.3, 0.4], np.float32)
    before = a.grad.copy()
    assert clip_grad_norm([a, Parameter(np.zeros(1))], max_norm=1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(a.grad, before)


def test_clip_grad_norm_returns_a_non_finite_norm_without_touching_grads():
    a = Parameter(np.zeros(2, np.float32))
    a.grad = np.array([np.inf, 1.0], np.float32)
    assert clip_grad_norm([a], 1.0) == math.inf
    assert a.grad[1] == 1.0

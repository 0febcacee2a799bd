"""PiSSA, OLoRA and LoRA+: the properties that define each (docs/variants.md), in float64 over
Hypothesis-drawn shapes.

PiSSA and OLoRA start A and B on W and train on the residual, so at initialisation W_res + s B A
is W; PiSSA's factors are W's top singular vectors, sqrt(S / s) on each side; OLoRA's B holds
orthonormal columns (Q's) and A is R's top rows; converting either to a plain adapter of rank 2r
gives the same weight on the original W. LoRA+ puts each parameter in PEFT's group, at its rate.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st

from minilora import ConfigError, ops
from minilora.hf.conversion import convert_to_lora
from minilora.lora import LoRAConfig, LoRALinear, add_adapter, apply_lora, lora_scaling
from minilora.lora.loraplus import GROUPS, create_loraplus_optimizer, loraplus_groups
from minilora.nn import Linear
from minilora.optim import SGD, AdamW
from tests.lora.helpers import EPS, PROPERTY, ToyGPT, assert_within_rounding, tokens

# A factorisation from LAPACK (SVD, Householder QR) is backward stable: its factors reproduce W,
# and are orthonormal, to a small multiple of n eps ||W|| (Golub & Van Loan, 4th ed., 5.2 and
# 8.6). 100 n eps is that multiple with room; a real mistake (a factor off by sqrt(s), a missing
# transpose) is O(1).
FACTOR_SLACK = 100


@st.composite
def residual_layers(draw):
    """(LoRALinear with PiSSA or OLoRA, the W it started from, its scaling), float64."""
    in_f, out_f = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    r = draw(st.integers(1, min(in_f, out_f)))
    alpha = draw(st.one_of(st.integers(1, 32), st.floats(0.25, 32.0)))
    rslora = draw(st.booleans())
    method = draw(st.sampled_from(("pissa", "olora")))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    base = Linear(in_f, out_f, bias=draw(st.booleans()), dtype=np.float64, rng=rng)
    base.weight.data = rng.normal(0.0, draw(st.sampled_from((0.1, 1.0, 30.0))), (out_f, in_f))
    W = base.weight.data.copy()
    layer = LoRALinear(base, r, alpha, use_rslora=rslora, init_lora_weights=method, rng=rng)
    return layer, W, lora_scaling(r, alpha, rslora)


def _n_eps(W: np.ndarray) -> float:
    return FACTOR_SLACK * max(W.shape) * EPS[np.dtype(np.float64)]


@PROPERTY
@given(residual_layers())
def test_residual_plus_scaled_ba_equals_w_at_initialisation(case):
    layer, W, s = case
    A, B, W_res = layer.lora_A.data, layer.lora_B.data, layer.weight.data
    assert_within_rounding(W_res + s * (B @ A), W, np.abs(W) + s * np.abs(B) @ np.abs(A),
                           layer.r + 2, np.float64)


@PROPERTY
@given(residual_layers(), st.integers(0, 2**31 - 1))
def test_a_fresh_pissa_or_olora_layer_gives_the_base_output(case, seed):
    layer, W, _ = case
    x = np.random.default_rng(seed).normal(size=(3, W.shape[1]))
    b = 0.0 if layer.bias is None else layer.bias.data
    expected = x @ W.T + b
    np.testing.assert_allclose(layer(x).data, expected, rtol=0,
                               atol=_n_eps(W) * (np.abs(x) @ np.abs(W).T + np.abs(b)).max())


@PROPERTY
@given(residual_layers())
def test_pissa_factors_are_the_top_singular_vectors_scaled_by_root_s_over_scaling(case):
    """A A^T = B^T B = diag(S_r / s) (rows of A, columns of B orthogonal, with those norms), and
    s B A is the best rank-r approximation of W: ||W - s B A||_2 = S_{r+1} (Eckart-Young)."""
    layer, W, s = case
    if layer.init_lora_weights != "pissa":
        return
    A, B, r = layer.lora_A.data, layer.lora_B.data, layer.r
    S = scipy.linalg.svdvals(W)
    tol = _n_eps(W) * S[0] / s
    np.testing.assert_allclose(A @ A.T, np.diag(S[:r] / s), rtol=0, atol=tol)
    np.testing.assert_allclose(B.T @ B, np.diag(S[:r] / s), rtol=0, atol=tol)
    rest = S[r] if r < len(S) else 0.0
    assert abs(np.linalg.norm(W - s * (B @ A), 2) - rest) <= _n_eps(W) * S[0]


@PROPERTY
@given(residual_layers())
def test_olora_b_has_orthonormal_columns_and_a_is_the_top_rows_of_r(case):
    """B = Q_r: B^T B = I_r; A = R_r, upper trapezoidal; and B A = Q_r R_r are W's first r
    columns' worth: W's first r columns equal (B A)'s (they depend on Q_r alone)."""
    layer, W, _ = case
    if layer.init_lora_weights != "olora":
        return
    A, B, r = layer.lora_A.data, layer.lora_B.data, layer.r
    np.testing.assert_allclose(B.T @ B, np.eye(r), rtol=0, atol=_n_eps(W))
    np.testing.assert_array_equal(np.tril(A, -1), 0.0)
    np.testing.assert_allclose((B @ A)[:, :r], W[:, :r], rtol=0,
                               atol=_n_eps(W) * np.abs(W).max())


@PROPERTY
@given(residual_layers(), st.integers(0, 2**31 - 1))
def test_the_rank_2r_conversion_gives_the_trained_weight_on_the_original_base(case, seed):
    """W + s' B' A' == W_res + s B A, with A' = [A; A_0], B' = [B | -B_0], r' = 2r, alpha'
    = 2 alpha (rsLoRA: sqrt(2) alpha), so s' = s."""
    layer, W, s = case
    A0, B0 = layer.lora_A.data.copy(), layer.lora_B.data.copy()
    rng = np.random.default_rng(seed)
    A, B = A0 + rng.normal(size=A0.shape), B0 + rng.normal(size=B0.shape)  # "trained"
    d = {"r": layer.r, "lora_alpha": layer.lora_alpha, "use_rslora": layer.use_rslora,
         "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": layer.init_lora_weights}
    tensors, d2 = convert_to_lora({"m.lora_A.weight": A, "m.lora_B.weight": B}, d,
                                  ("init", {"m.lora_A.weight": A0, "m.lora_B.weight": B0}))
    A2, B2 = tensors["m.lora_A.weight"], tensors["m.lora_B.weight"]
    assert A2.shape == (2 * layer.r, W.shape[1]) and B2.shape == (W.shape[0], 2 * layer.r)
    assert d2["r"] == 2 * layer.r and d2["init_lora_weights"] is True
    s2 = lora_scaling(d2["r"], d2["lora_alpha"], layer.use_rslora)
    assert s2 == pytest.approx(s, rel=4 * EPS[np.dtype(np.float64)])
    magnitude = np.abs(W) + s * (np.abs(B) @ np.abs(A) + 2 * np.abs(B0) @ np.abs(A0))
    assert_within_rounding(W + s2 * (B2 @ A2), layer.weight.data + s * (B @ A), magnitude,
                           2 * layer.r + 4, np.float64)


def test_the_conversion_refuses_what_peft_would_drop():
    d = {"r": 1, "lora_alpha": 1, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}
    with pytest.raises(ConfigError, match="drop them silently"):
        convert_to_lora({"m.lora_A.weight": np.ones((1, 2)), "m.bias": np.ones(2)}, d,
                        ("init", {"m.lora_A.weight": np.ones((1, 2))}))


# ---- on a model ------------------------------------------------------------------------------

def test_an_embedding_gets_the_plain_initialisation_under_pissa_as_in_peft():
    model = ToyGPT(c=6)
    wte = model.transformer.wte.weight.data.copy()
    apply_lora(model, LoRAConfig(r=2, target_modules=["wte", "c_attn"], init_lora_weights="pissa"),
               rng=0)
    layer = model.transformer.wte
    np.testing.assert_array_equal(layer.lora_embedding_A.data, 0.0)
    np.testing.assert_array_equal(layer.weight.data, wte)
    assert not np.array_equal(model.transformer.h[0].attn.c_attn.lora_B.data, 0.0)


@pytest.mark.parametrize("value, shown", [
    ("pissa_niter_4", "no randomized SVD"),
    ("olora_fast", "got 'olora_fast'"),
])
def test_an_initialisation_minilora_does_not_have_is_refused_by_name(value, shown):
    with pytest.raises(ConfigError, match=shown) as e:
        LoRAConfig(init_lora_weights=value)
    assert "LoRAConfig.init_lora_weights" in str(e.value)


def test_a_rank_above_the_weights_is_refused_naming_the_layer():
    with pytest.raises(ConfigError, match="r=4 directions of W, which has only 3"):
        LoRALinear(Linear(3, 5, rng=0), 4, 4, init_lora_weights="olora")


def test_pissa_does_not_combine_with_slices():
    with pytest.raises(ConfigError, match="target_slices"):
        LoRAConfig(init_lora_weights="pissa", target_slices={"c_attn": ["q", "v"]})


@pytest.mark.parametrize("method", ["pissa", "olora"])
@pytest.mark.parametrize("loraplus", [False, True])
def test_the_frozen_residual_never_changes_during_training(method, loraplus):
    model = ToyGPT(c=6)
    apply_lora(model, LoRAConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                                 init_lora_weights=method, bias="all"), rng=0)
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if not p.requires_grad}
    assert "transformer.h.0.attn.c_attn.weight" in frozen
    optimizer = create_loraplus_optimizer(model, AdamW, lr=1e-2, loraplus_lr_ratio=16,
                                          loraplus_weight_decay=0.1) if loraplus else \
        AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    idx, targets = tokens(3)
    for _ in range(3):
        logits = model(idx)
        ops.cross_entropy(logits, targets).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        if name in frozen:
            np.testing.assert_array_equal(p.data, frozen[name], err_msg=name)
            assert p.grad is None, name


# ---- LoRA+ ---------------------------------------------------------------------------------

def _expected_group(name: str) -> str:
    """PEFT's rule, from the name alone on ToyGPT (its LayerNorms are ln_1, ln_2, ln_f)."""
    if ".wte." in f".{name}" and "lora_embedding" in name:
        return "embedding"
    leaf = name.rpartition(".")[2]
    one_d = leaf in ("bias", "weight") and (".ln_" in name or leaf == "bias")
    if "lora_B" in name or one_d:
        return "groupB_no_decay" if "bias" in name or ".ln_" in name else "groupB"
    return "groupA"


@PROPERTY
@given(lr=st.floats(1e-5, 1.0), ratio=st.floats(1.0, 64.0), wd=st.floats(0.0, 0.5),
       embedding_lr=st.floats(1e-7, 1e-2), bias=st.sampled_from(("none", "all", "lora_only")),
       saved=st.sampled_from((None, ("ln_f",), ("c_proj",))))
def test_loraplus_puts_each_parameter_in_peft_group_at_its_rate(lr, ratio, wd, embedding_lr,
                                                                 bias, saved):
    model = ToyGPT(c=4)
    apply_lora(model, LoRAConfig(r=2, target_modules=["c_attn", "wte"], bias=bias,
                                 modules_to_save=saved), rng=0)
    opt = create_loraplus_optimizer(model, AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                    loraplus_weight_decay=wd, loraplus_lr_embedding=embedding_lr)
    rates = {"groupA": (lr, wd), "embedding": (embedding_lr, wd), "groupB": (lr * ratio, wd),
             "groupB_no_decay": (lr * ratio, 0.0)}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [n for g in opt.param_groups for n in g["names"]] == \
        [n for g in GROUPS for n in trainable if _expected_group(n) == g]
    for group_name, group in zip(GROUPS, opt.param_groups, strict=True):
        assert (group["lr"], group["weight_decay"]) == rates[group_name], group_name
    assert opt.param_groups[2]["names"], "lora_B is in groupB"
    opt.set_lr(lr / 2)  # what the schedule does: every rate halves, the ratios stay
    for group_name, group in zip(GROUPS, opt.param_groups, strict=True):
        assert group["lr"] == pytest.approx(rates[group_name][0] / 2, rel=1e-12), group_name


def test_loraplus_takes_any_optimizer_and_refuses_a_bad_ratio():
    model = apply_lora(ToyGPT(), LoRAConfig(r=1), rng=0)
    opt = create_loraplus_optimizer(model, SGD, lr=0.1, loraplus_lr_ratio=4, momentum=0.9)
    assert [g["lr"] for g in opt.param_groups if g["params"]] == [0.1, 0.4]
    assert set(loraplus_groups(model)) == set(GROUPS)
    with pytest.raises(ConfigError, match="loraplus_lr_ratio"):
        create_loraplus_optimizer(model, AdamW, lr=0.1, loraplus_lr_ratio=0)


def test_adding_an_adapter_beside_pissa_warns_as_peft_does():
    model = apply_lora(ToyGPT(c=6), LoRAConfig(r=2, init_lora_weights="pissa"), rng=0)
    with pytest.warns(UserWarning, match=r"\['default'\] changed the base weights"):
        add_adapter(model, "other", LoRAConfig(r=2), rng=1)

"""Module: registration, dotted names, tied weights, state dicts, modes, dtype, ModuleList."""

from __future__ import annotations

import numpy as np
import pytest

from minilora import ConfigError, MiniLoRAError, ShapeError, StateDictError, Tensor
from minilora.nn import Embedding, LayerNorm, Linear, Module, ModuleList, Parameter


class Block(Module):
    def __init__(self, rng):
        super().__init__()
        self.ln = LayerNorm(3, dtype=np.float64)
        self.fc = Linear(3, 5, dtype=np.float64, rng=rng)
        self.proj = Linear(5, 3, bias=False, dtype=np.float64, rng=rng)
        self.note = "not a parameter"  # plain attributes are not registered
        self.cache = Tensor(np.zeros(2))  # nor is a plain Tensor

    def forward(self, x):
        return x + self.proj(self.fc(self.ln(x)))


class Net(Module):
    """wte -> blocks -> head (tied to wte), like GPT-2's layout."""

    def __init__(self, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.wte = Embedding(7, 3, dtype=np.float64, rng=rng)
        self.h = ModuleList([Block(rng), Block(rng)])
        self.scale = Parameter(np.ones(3))
        self.head = Linear(3, 7, bias=False, dtype=np.float64, rng=rng)
        self.head.weight = self.wte.weight  # tied

    def forward(self, idx):
        x = self.wte(idx)
        for block in self.h:
            x = block(x)
        return self.head(x * self.scale)


# as PyTorch: a module's own parameters first (in assignment order), then each child's, depth first
NAMES = ["scale", "wte.weight",
         "h.0.ln.weight", "h.0.ln.bias", "h.0.fc.weight", "h.0.fc.bias", "h.0.proj.weight",
         "h.1.ln.weight", "h.1.ln.bias", "h.1.fc.weight", "h.1.fc.bias", "h.1.proj.weight"]


def test_named_parameters_are_dotted_in_assignment_order_and_tied_ones_once():
    net = Net()
    assert [n for n, _ in net.named_parameters()] == NAMES
    assert list(net.state_dict()) == NAMES
    total = 21 + 2 * (6 + 20 + 15) + 3  # wte, two blocks, scale; head.weight is wte.weight
    assert net.num_parameters() == sum(p.size for p in net.parameters()) == total
    assert len(list(net.parameters())) == len(NAMES)


def test_named_modules_and_children():
    net = Net()
    assert [n for n, _ in net.named_modules()] == [
        "", "wte", "h", "h.0", "h.0.ln", "h.0.fc", "h.0.proj", "h.1", "h.1.ln", "h.1.fc",
        "h.1.proj", "head"]
    assert [type(m).__name__ for m in net.children()] == ["Embedding", "ModuleList", "Linear"]
    assert net.get_submodule("h.1.fc") is net.h[1].fc


def test_plain_attributes_and_tensors_are_not_registered():
    block = Block(np.random.default_rng(0))
    assert "note" not in block._parameters and "cache" not in block._parameters
    block.fc = None  # assigning a non-module unregisters the old one
    assert [n for n, _ in block.named_modules()] == ["", "ln", "proj"]


def test_replacing_a_submodule_keeps_its_place_in_the_order():
    net = Net()
    net.set_submodule("h.0.fc", Linear(3, 5, dtype=np.float64, rng=1))
    assert [n for n, _ in net.named_parameters()] == NAMES  # fc still before proj
    net.h[0].ln.weight = Parameter(np.full(3, 2.0))
    assert [n for n, _ in net.named_parameters()] == NAMES


def test_state_dict_round_trip_is_bit_exact_and_state_dict_copies():
    source, target = Net(seed=1), Net(seed=2)
    state = source.state_dict()
    state["scale"][:] = 7.0  # a copy: the model must not change
    assert np.all(source.scale.data == 1.0)
    target.load_state_dict(source.state_dict())
    for name, value in source.state_dict().items():
        np.testing.assert_array_equal(target.state_dict()[name], value)
    idx = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(target(idx).data, source(idx).data)
    assert target.head.weight is target.wte.weight  # the tie survives loading


def assert_same(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize(("change", "error", "named"), [
    (lambda s: s.pop("h.1.fc.bias"), StateDictError, "missing keys ['h.1.fc.bias']"),
    (lambda s: s.update({"h.2.fc.bias": np.zeros(5)}), StateDictError,
     "unexpected keys ['h.2.fc.bias']"),
    (lambda s: s.update({"h.1.fc.weight": np.zeros((3, 5))}), ShapeError,
     "'h.1.fc.weight' has shape (3, 5), the model expects (5, 3)"),
    (lambda s: s.update({"scale": np.array(["a", "b", "c"])}), StateDictError, "non-numeric dtype"),
])
def test_a_bad_state_dict_is_named_and_leaves_the_model_untouched(change, error, named):
    net, state = Net(seed=1), Net(seed=2).state_dict()
    change(state)
    before = net.state_dict()
    with pytest.raises(error) as e:
        net.load_state_dict(state)
    assert named in str(e.value) and isinstance(e.value, MiniLoRAError)
    assert_same(net.state_dict(), before)


def test_a_mis_shaped_key_is_refused_even_when_not_strict():
    net = Net()
    state = Net(seed=3).state_dict()
    state["h.0.fc.bias"] = np.zeros(4)
    before = net.state_dict()
    with pytest.raises(ShapeError):
        net.load_state_dict(state, strict=False)
    assert_same(net.state_dict(), before)


def test_non_strict_loading_reports_what_it_skipped():
    net = Net()
    state = Net(seed=3).state_dict()
    del state["scale"]
    state["extra"] = np.zeros(1)
    result = net.load_state_dict(state, strict=False)
    assert result.missing_keys == ["scale"] and result.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(net.wte.weight.data, state["wte.weight"])


def test_loading_converts_to_the_models_dtype():
    net = Net()
    state = {k: v.astype(np.float32) for k, v in Net(seed=4).state_dict().items()}
    net.load_state_dict(state)
    assert all(p.dtype == np.float64 for p in net.parameters())


def test_train_and_eval_reach_every_module():
    net = Net()
    assert net.eval() is net and not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())


def test_requires_grad_and_zero_grad():
    net = Net()
    loss = net(np.array([[0, 1]])).sum()
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    net.requires_grad_(False)
    assert net.num_parameters(trainable_only=True) == 0


def test_astype_converts_every_parameter_and_the_computation():
    net = Net().astype(np.float32)
    assert all(p.dtype == np.float32 for p in net.parameters())
    assert net(np.array([[0, 1]])).dtype == np.float32
    assert net.head.weight is net.wte.weight


def test_astype_refuses_a_non_float_dtype():
    net = Net()
    with pytest.raises(ConfigError, match="floating point, got int32"):
        net.astype(np.int32)
    assert all(p.dtype == np.float64 for p in net.parameters())


def test_module_list_indexes_iterates_and_names_by_position():
    layers = ModuleList([Linear(2, 2, rng=0)])
    layers.append(Linear(2, 3, rng=1))
    assert len(layers) == 2 and layers[-1].out_features == 3
    assert [m.out_features for m in layers] == [2, 3]
    assert [n for n, _ in layers.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_a_subclass_must_call_super_init_and_define_forward():
    class Forgetful(Module):
        def __init__(self):
            self.w = Parameter(np.zeros(1))

    with pytest.raises(AttributeError, match="super"):
        Forgetful()
    with pytest.raises(NotImplementedError):
        Module()(1)


def test_unknown_submodule_paths_are_named():
    with pytest.raises(StateDictError, match="no submodule 'fc2'"):
        Net().get_submodule("h.0.fc2")
    with pytest.raises(StateDictError, match="no submodule 'mlp'"):
        Net().set_submodule("h.0.mlp", Linear(1, 1))


def test_repr_shows_the_tree():
    text = repr(Net())
    assert "(h): ModuleList" in text
    assert "(fc): Linear(in_features=3, out_features=5, bias=True)" in text

"""TrainConfig: defaults, a ConfigError naming the field for every bad value, JSON round trip."""

from __future__ import annotations

import pytest

from minilora.errors import ConfigError
from minilora.train import TrainConfig


def test_defaults_are_nanogpt_shakespeare_char_on_a_cpu():
    c = TrainConfig()
    assert (c.batch_size, c.max_iters, c.lr, c.min_lr, c.warmup_iters) == (12, 2000, 1e-3, 1e-4,
                                                                          100)
    assert (c.beta2, c.weight_decay, c.grad_clip, c.eval_interval) == (0.99, 0.1, 1.0, 250)
    assert c.decay_iters == 2000


@pytest.mark.parametrize(("field", "value"), [
    ("batch_size", 0), ("batch_size", -1), ("batch_size", 2.5), ("batch_size", True),
    ("max_iters", -1), ("max_iters", "10"), ("eval_interval", 0), ("eval_iters", 0),
    ("warmup_iters", -2), ("seed", -1),
    ("lr", 0.0), ("lr", -1e-3), ("lr", float("nan")), ("lr", float("inf")), ("lr", "1e-3"),
    ("min_lr", -1.0), ("min_lr", 1.0), ("weight_decay", -0.1), ("grad_clip", -1.0),
    ("beta1", 1.0), ("beta2", 1.5), ("lr_decay_iters", 50), ("lr_decay_iters", 2.0),
    ("on_nonfinite", "ignore"),
])
def test_a_bad_value_is_a_config_error_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_zero_is_a_valid_value_where_it_means_something():
    c = TrainConfig(max_iters=0, warmup_iters=0, weight_decay=0, grad_clip=0, seed=0, min_lr=0)
    assert (c.max_iters, c.weight_decay, c.grad_clip, c.min_lr) == (0, 0.0, 0.0, 0.0)
    assert isinstance(c.weight_decay, float)


def test_round_trips_through_a_dict_and_refuses_unknown_fields():
    c = TrainConfig(max_iters=7, lr=3e-3, seed=5, on_nonfinite="skip")
    assert TrainConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown fields"):
        TrainConfig.from_dict({**c.to_dict(), "learning_rate": 1.0})
    with pytest.raises(ConfigError, match="JSON object"):
        TrainConfig.from_dict([1, 2])


def test_the_cosine_reaches_min_lr_at_lr_decay_iters_or_max_iters():
    assert TrainConfig(max_iters=500, warmup_iters=10).decay_iters == 500
    assert TrainConfig(max_iters=500, warmup_iters=10, lr_decay_iters=300).decay_iters == 300
    assert TrainConfig(max_iters=5, warmup_iters=10).decay_iters == 10

"""Bad input to an op raises a ShapeError (a MiniLoRAError, a ValueError) naming the shapes."""

import numpy as np
import pytest

from minilora import MiniLoRAError, ShapeError, Tensor, ops


def t(*shape):
    return Tensor(np.ones(shape))


# (what goes wrong, the call, a regex the message must match: the shapes or the reason)
BAD_INPUT = {
    "matmul inner sizes": (lambda: ops.matmul(t(2, 3), t(4, 5)), r"\(2, 3\).*\(4, 5\).*3 != 4"),
    "matmul batch axes": (lambda: ops.matmul(t(2, 1, 3), t(3, 3, 1)), r"\(2, 1, 3\).*\(3, 3, 1\)"),
    "matmul 0-d operand": (lambda: ops.matmul(t(), t(3)), r"1-D.*\(\).*\(3,\)"),
    "@ operator": (lambda: t(2, 3) @ t(2, 3), r"\(2, 3\) and \(2, 3\)"),
    "add not broadcastable": (lambda: t(2, 3) + t(4), r"\(2, 3\) and \(4,\).*broadcast"),
    "mul not broadcastable": (lambda: ops.mul(t(2, 3), t(2, 1, 2)), r"\(2, 3\) and \(2, 1, 2\)"),
    "where not broadcastable": (lambda: ops.where(np.ones(5, bool), t(2, 3), t(3)),
                                r"\(5,\).*\(2, 3\).*\(3,\)"),
    "masked_fill growing": (lambda: ops.masked_fill(t(3), np.ones((2, 3), bool), 0.0),
                            r"\(2, 3\).*\(3,\)"),
    "linear in_features": (lambda: ops.linear(t(2, 3), t(4, 5)), r"\(2, 3\).*\(4, 5\)"),
    "linear bias": (lambda: ops.linear(t(2, 3), t(4, 3), t(3)), r"bias of shape \(3,\).*\(4,\)"),
    "reshape size": (lambda: ops.reshape(t(2, 3), (4, 2)), r"\(2, 3\) into \(4, 2\)"),
    "transpose axes": (lambda: ops.transpose(t(2, 3), (0, 0)), r"\(0, 0\).*2 axes"),
    "transpose axis out of range": (lambda: ops.transpose(t(2, 3), (2, 1)), r"\(2, 1\).*2 axes"),
    "swapaxes out of range": (lambda: ops.swapaxes(t(2, 3), 0, 2), r"\(0, 2\).*\(2, 3\)"),
    "sum axis out of range": (lambda: ops.sum(t(2, 3), axis=2), r"axis 2.*2 dimensions"),
    "getitem out of range": (lambda: t(2, 3)[5], r"5.*\(2, 3\)"),
    "concatenate shapes": (lambda: ops.concatenate([t(2, 3), t(2, 4)]), r"\(2, 3\), \(2, 4\)"),
    "stack shapes": (lambda: ops.stack([t(2, 3), t(3, 2)]), r"\(2, 3\), \(3, 2\)"),
    "stack axis out of range": (lambda: ops.stack([t(2, 3), t(2, 3)], axis=3), r"axis 3.*3 dim"),
    "split sections": (lambda: ops.split(t(5, 2), 2), r"length 5.*2"),
    "split axis out of range": (lambda: ops.split(t(4, 2), 2, axis=2), r"axis 2.*\(4, 2\)"),
    "cross_entropy targets shape": (lambda: ops.cross_entropy(t(2, 3), np.zeros(3, int)),
                                    r"\(2, 3\).*\(2,\).*\(3,\)"),
    "cross_entropy target range": (lambda: ops.cross_entropy(t(2, 3), np.array([0, 3])),
                                   r"target 3.*\[0, 3\)"),
    "cross_entropy float targets": (lambda: ops.cross_entropy(t(2, 3), np.zeros(2)), "integers"),
    "layer_norm weight": (lambda: ops.layer_norm(t(2, 3), t(4), None), r"weight.*\(4,\).*\(3,\)"),
    "attention shapes": (lambda: ops.scaled_dot_product_attention(t(2, 3), t(2, 4), t(2, 4)),
                         r"q \(2, 3\), k \(2, 4\)"),
    "causal_self_attention 2-D": (lambda: ops.causal_self_attention(t(4, 6), 1),
                                  r"\(4, 6\).*\(B, T, 3C\)"),
    "causal_self_attention heads": (lambda: ops.causal_self_attention(t(1, 2, 6), 4),
                                    r"\(1, 2, 6\).*divisible by 4"),
    "lora_linear A": (lambda: ops.lora_linear(t(2, 3), t(4, 3), None, t(2, 5), t(4, 2), 1.0),
                      r"A \(2, 5\).*\(r, 3\)"),
}


@pytest.mark.parametrize("call, message", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_raises_a_shape_error_naming_the_shapes(call, message):
    with pytest.raises(ShapeError, match=message) as caught:
        call()
    assert isinstance(caught.value, MiniLoRAError) and isinstance(caught.value, ValueError)

import numpy as np

import minilora as ml
from minilora import ops


def test_linear_backward_keeps_float32():
    x = ml.Tensor(np.ones((2, 3), np.float32), requires_grad=True)
    w = ml.Tensor(np.ones((4, 3), np.float32), requires_grad=True)
    loss = ops.linear(x, w).sum()
    loss.backward()
    assert loss.dtype == np.float32 and x.grad.dtype == np.float32
    np.testing.assert_array_equal(w.grad, np.full((4, 3), 2.0, np.float32))

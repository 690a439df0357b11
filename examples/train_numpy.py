"""Train a tiny model on NumPy with arraybn's backward pass: linear -> BatchNormalization -> squared loss.

No autodiff library: the linear layer's gradient is written by hand and the
batch normalization's comes from ``layer.backward``. After each SGD step the
layer's constraints are applied (``gamma_constraint="non_neg"``), as Keras's
optimizer does. Run with ``python examples/train_numpy.py``; the loss goes down.
"""

from __future__ import annotations

import numpy as np

import arraybn


def main(steps: int = 30, batch: int = 32, lr: float = 0.1, lr_linear: float = 1.0, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    n_in, n_out = 5, 3
    true_w = rng.normal(size=(n_in, n_out))
    w = 0.1 * rng.normal(size=(n_in, n_out))
    bn = arraybn.BatchNormalization(momentum=0.9, gamma_constraint="non_neg", dtype="float64")
    losses = []
    for step in range(steps):
        x = rng.normal(size=(batch, n_in))
        target = np.tanh(x @ true_w) * 2.0 + 0.5  # the model must learn gamma ~ scale, beta ~ shift

        h = x @ w  # linear layer
        y, ctx = bn.forward(h, training=True)  # updates the moving statistics like bn(h, training=True)
        diff = y - target
        loss = float(np.mean(diff * diff))
        losses.append(loss)

        dy = 2.0 * diff / diff.size  # d loss / d y
        dh, grads = bn.backward(ctx, dy)
        dw = x.T @ dh

        w -= lr_linear * dw
        names = bn.weight_names
        new = [v - lr * grads[n] if n in grads else v for n, v in zip(names, bn.get_weights(), strict=True)]
        bn.set_weights(new)
        bn.apply_constraints()  # gamma >= 0
        if step % 5 == 0 or step == steps - 1:
            print(f"step {step:2d}  loss {loss:.4f}  gamma {np.round(bn.get_weights()[0], 3)}")
    y_eval = bn(x @ w, training=False)  # inference with the moving statistics
    print(f"inference loss on the last batch: {float(np.mean((y_eval - target) ** 2)):.4f}")
    return losses


if __name__ == "__main__":
    losses = main()
    assert losses[-1] < 0.5 * losses[0], "the loss did not go down"

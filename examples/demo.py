"""A short tour of arraybn on NumPy: one training step, one inference call."""

import numpy as np

import arraybn

rng = np.random.default_rng(0)
x = (rng.standard_normal((32, 8, 8, 4)) * 3.0 + 5.0).astype(np.float32)  # NHWC, channels last

layer = arraybn.BatchNormalization(momentum=0.9)  # TF's v1 Keras layer, TF's defaults otherwise
y = layer(x, training=True)  # batch statistics; moving statistics updated

print(f"layer: {layer.name}, fused path emulated: {layer.fused} (4-D input, axis=-1)")
print("training output  mean per channel:", np.round(y.mean(axis=(0, 1, 2)), 4))
print("training output  std  per channel:", np.round(y.std(axis=(0, 1, 2)), 4))
print("moving_mean     after one step:  ", np.round(layer.moving_mean, 4))
print("moving_variance after one step:  ", np.round(layer.moving_variance, 4))

y_inf = layer(x, training=False)  # moving statistics
print("inference output mean per channel:", np.round(y_inf.mean(axis=(0, 1, 2)), 4))
print("weights (TF order):", layer.weight_names)

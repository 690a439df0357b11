"""A short tour of arraybn on NumPy: one training step, one inference call, and why they differ."""

import numpy as np

import arraybn


def show(label: str, values: np.ndarray, decimals: int = 4) -> None:
    print(f"  {label:<42}", np.round(values, decimals) + 0.0)  # + 0.0: print -0.0 as 0.0


rng = np.random.default_rng(0)
x = (rng.standard_normal((32, 8, 8, 4)) * 3.0 + 5.0).astype(np.float32)  # NHWC; mean about 5, std about 3
n = 32 * 8 * 8  # values per channel

layer = arraybn.BatchNormalization(momentum=0.9)  # TF's v1 Keras layer; TF's defaults otherwise
print(f"{layer.name}: axis=-1 (the last axis holds the 4 channels), momentum=0.9, epsilon=1e-3")
print("Input: per channel mean about 5 and standard deviation about 3.")

print("\n1. A training call, layer(x, training=True)")
y = layer(x, training=True)
print("  The output is normalized with this batch's own mean and variance, so per channel it has")
print("  mean 0 and standard deviation sqrt(var / (var + epsilon)), just under 1:")
show("training output mean per channel", y.mean(axis=(0, 1, 2)))
show("training output std per channel", y.std(axis=(0, 1, 2)))

print("\n2. The moving statistics after this one step")
print("  Each moves (1 - momentum) = 10% of the way from its initial value towards the batch's:")
print("  moving = moving - (moving - batch) * (1 - momentum), from mean 0 and variance 1.")
print("  This is TF's fused path (4-D input, channel axis last): the batch variance in the moving")
print(f"  variance has Bessel's correction n / (n - 1), n = {n} values per channel.")
mean = x.mean(axis=(0, 1, 2), dtype=np.float64)
var = x.var(axis=(0, 1, 2), dtype=np.float64)
show("moving_mean", layer.moving_mean)
show("  expected 0.9 * 0 + 0.1 * mean", 0.1 * mean)
show("moving_variance", layer.moving_variance)
show("  expected 0.9 * 1 + 0.1 * var * n/(n-1)", 0.9 + 0.1 * var * n / (n - 1))

print("\n3. An inference call on the same batch, layer(x) (training=None means inference)")
print("  Inference normalizes with the moving statistics, which after one step are still far")
print("  from the batch's (mean about 0.5 instead of 5, variance about 1.8 instead of 9), so the")
print("  output is not centred: (x - moving_mean) / sqrt(moving_variance + epsilon).")
y_inf = layer(x)
show("inference output mean per channel", y_inf.mean(axis=(0, 1, 2)), 3)
show("  expected (mean - moving) / sqrt(...)", (mean - layer.moving_mean) / np.sqrt(layer.moving_variance + 1e-3), 3)
print("  After many training steps the moving statistics approach the data's, and the inference")
print("  output of this batch would approach the training output.")

print("\nweights, in TF's order:", layer.weight_names)

"""Adapters that drive other frameworks' batch normalization through the conformance runner.

Each module exposes ``factory(init_kwargs) -> layer`` for ``python -m conformance --impl``:

* ``torch_functional`` -- ``torch.nn.functional.batch_norm``;
* ``torch_module``     -- ``torch.nn.BatchNorm1d/2d/3d``;
* ``keras3``           -- Keras 3's ``keras.layers.BatchNormalization`` (torch backend unless
  ``KERAS_BACKEND`` says otherwise);
* ``flax_linen``       -- ``flax.linen.BatchNorm`` (JAX);
* ``onnxruntime_op``   -- ONNX Runtime running the ONNX ``BatchNormalization`` operator.

An adapter maps TensorFlow's arguments to the framework's conventions (torch's momentum is
``1 - momentum``, the channel axis moved to position 1, ...) and raises ``NotImplementedError``
with a message ``"<behaviour tag>: why"`` for what the framework cannot express. They are numerics
ports: run them with ``--numerics-only`` (none of them has Keras's ``get_config``).
``python -m conformance.matrix`` runs them all and writes docs/frameworks.md.
"""

ADAPTERS = {
    "torch.nn.functional.batch_norm": f"{__name__}.torch_functional:factory",
    "torch.nn.BatchNorm*d": f"{__name__}.torch_module:factory",
    "keras.layers.BatchNormalization (Keras 3)": f"{__name__}.keras3:factory",
    "flax.linen.BatchNorm": f"{__name__}.flax_linen:factory",
    "ONNX Runtime BatchNormalization": f"{__name__}.onnxruntime_op:factory",
}

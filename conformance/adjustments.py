"""Named ``adjustment`` functions used by the conformance cases.

TensorFlow's ``adjustment`` argument is a callable that receives the dynamic
shape of the (already cast) input tensor and returns ``(scale, bias)`` that are
applied to the normalized values before ``gamma``/``beta``, only in training.

Callables cannot be stored in JSON, so a case stores
``{"__adjustment__": "<name>"}`` in place of the callable and every reader
substitutes the function of that name.  The functions below are the
definition; a port in another language re-implements them from the docstrings.

Both functions depend on the shape so that passing the right shape is tested,
and both return Python floats (broadcastable to any parameter shape), so a port
needs no array namespace to implement them.

* ``array_impl(name)`` -- the callable for array-API ports such as arraybn:
  called as ``fn(shape)`` with ``shape`` a tuple of Python ints.
* ``tf_impl(name)``    -- the callable handed to TensorFlow: receives
  ``tf.shape(inputs)`` (an int32 tensor; eager mode) and calls the same code.
"""

from __future__ import annotations


def batch_affine(shape):
    """``scale = 1 + 1 / shape[0]``, ``bias = 0.1 * len(shape)``.

    ``shape[0]`` is the batch size of the input the layer was called with and
    ``len(shape)`` its rank.
    """
    shape = tuple(int(s) for s in shape)
    return 1.0 + 1.0 / shape[0], 0.1 * len(shape)


def last_dim_affine(shape):
    """``scale = 0.5 + 0.25 * len(shape)``, ``bias = -0.05 * shape[-1]``."""
    shape = tuple(int(s) for s in shape)
    return 0.5 + 0.25 * len(shape), -0.05 * shape[-1]


ADJUSTMENTS = {
    "batch_affine": batch_affine,
    "last_dim_affine": last_dim_affine,
}

MARKER = "__adjustment__"


def array_impl(name):
    """Return the shape-tuple callable registered under ``name``."""
    return ADJUSTMENTS[name]


def tf_impl(name):
    """Return a callable suitable for TensorFlow's ``adjustment`` argument."""
    fn = ADJUSTMENTS[name]

    def _tf_adjustment(shape_tensor):
        return fn(tuple(int(v) for v in shape_tensor.numpy()))

    _tf_adjustment.__name__ = name
    return _tf_adjustment


def resolve(kwargs, impl=array_impl):
    """Replace ``{"__adjustment__": name}`` in constructor kwargs by a callable."""
    out = dict(kwargs)
    adj = out.get("adjustment")
    if isinstance(adj, dict) and MARKER in adj:
        out["adjustment"] = impl(adj[MARKER])
    return out

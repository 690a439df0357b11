"""Benchmarks: arraybn against TensorFlow, PyTorch and a plain copy (the memory-bandwidth yardstick).

Run ``python -m benchmarks --help``; ``docs/performance.md`` explains the method.
Nothing here is imported by ``arraybn`` or by the tests, and no timing is ever asserted.
"""

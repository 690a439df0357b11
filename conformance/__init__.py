"""Conformance suite for arraybn against TensorFlow's tf-keras v1 BatchNormalization.

* ``conformance.cases``        -- the case grid, as plain data (no TensorFlow).
* ``conformance.adjustments``  -- the named ``adjustment`` functions used by cases.
* ``conformance.generate``     -- writes the golden files (needs TensorFlow).
* ``conformance.runner``       -- replays the golden files against an implementation.

See ``docs/conformance.md`` for the file format and the comparison rules.
"""

FORMAT_VERSION = 1


def read_json(path):
    """A golden JSON document, gzip-compressed (``.json.gz``) or not: the one reader of the format."""
    import gzip
    import json

    if path.endswith(".gz"):
        with gzip.open(path, "rt") as f:
            return json.load(f)
    with open(path) as f:
        return json.load(f)

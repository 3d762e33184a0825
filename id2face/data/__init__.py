"""Face data: datasets (SynthFaces, aligned real-face folders), same-identity pairs, splits, datamodule.

Item contract (every dataset): a dict with ``image`` (3, S, S) float in [-1, 1] RGB, ``mask``
(1, S, S) in {0, 1} (1 = identity-bearing inner face), ``landmarks`` (5, 2) pixel (x, y) in the order
left eye, right eye, nose, left mouth corner, right mouth corner (as seen in the image) and
``identity`` int (-1 = unlabelled). Importing this package is cheap; import the submodules you need.
"""

"""Constants of the equations that the specification (reference/) and the fast paths share.

Below both layers, so a fast path never imports the specification for a number.
"""

DELTA = 0.005
"""SAM: a slot counts as accessed when its write plus read weight exceeds this (Rae et al.)."""

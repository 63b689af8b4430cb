"""tritonbits-harness: the test and benchmark policy of tritonbits (GPU profiles, tolerances, timing,
benchmark registry, records and reports). Imports `tritonbits` and `tritonbits_reference`; neither imports it."""

from .__about__ import __version__

__all__ = ["__version__"]

"""napari-ebm: energy-based reconstruction of cryo-ET tomograms.

The core (this package, except :mod:`napari_ebm._napari`) needs only numpy and torch and never
imports Qt or napari.
"""

__version__ = "0.1.0"

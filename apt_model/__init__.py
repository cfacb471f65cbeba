"""apt_model: the APT (autopoietic transformer) language model and its trainer.

Its runs are written through ``aptbundle`` and continued by ``aptbundle resume``.
"""

__version__ = "0.1.0"

"""aptbundle: make a training run portable.

A run is one self-describing directory (see ``aptbundle.run``); an archive is one verified
``NAME.aptrun.tar.zst`` (see ``aptbundle.archive``). Importing this package never imports torch.
"""

__version__ = "0.1.0"

from aptbundle.errors import AptBundleError  # noqa: E402

__all__ = ["AptBundleError", "__version__"]

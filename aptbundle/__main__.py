"""``python -m aptbundle`` is the ``aptbundle`` command."""

from aptbundle.cli import main

main()

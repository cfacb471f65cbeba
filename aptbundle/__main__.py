"""``python -m aptbundle`` is the ``aptbundle`` command."""

from aptbundle.commands.cli import main

main()

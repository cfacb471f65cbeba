"""What the archive and the store share to move a run (neither imports the other).

``view`` is the read side: the consistent, verified, hard-linked state of a run that ``pack``
and ``push`` read. ``materialize`` is the write side: the temporary folder beside ``DEST/NAME``
that ``unpack`` and ``pull`` fill, and the rules for replacing what is already there, which never
lose a file of the user's. ``codec`` is the ``--dense`` byte grouping and the compression
settings, ``frames`` the guard that hands zstd exactly one frame, ``remote`` the fsspec URLs.
Nothing here imports torch.
"""

"""Commands: ``resume``, what is at a path (``overview``), and the command line with its one
progress bar and its one error-to-exit-status mapping, shared by every program of the project."""

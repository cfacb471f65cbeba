"""Backups from the frameworks people train with, and one line to carry on elsewhere.

``aptbundle.integrations.transformers``, ``.lightning`` and ``.accelerate`` each offer a way to
back a run up while it trains (a callback, or a wrapper of ``save_state``) and ``restore``;
each imports its framework, so import the one you use. ``live`` is what they share.
"""

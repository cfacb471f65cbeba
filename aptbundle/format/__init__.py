"""The run format: the manifest, the run folder, the static content scan and the one verifier."""

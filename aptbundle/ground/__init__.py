"""Ground floor: the exception tree, problems and reports, file helpers, temporaries, the path
rules and the run lock. Nothing here imports another layer of aptbundle."""

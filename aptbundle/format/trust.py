"""The trust policy: how each file of a run may be loaded, decided per file, never per folder.

Every file that can hide code is scanned statically (``scan``); what the scan accepts depends on
how the file is loaded by the code that reads it:

``default``
    loaded with ``torch.load(weights_only=True)`` (or safetensors): only tensors and plain data.
``numpy-rng``
    the random-number states the Hugging Face ``Trainer`` (``checkpoint-N/rng_state.pth``,
    ``checkpoint-N/rng_state_N.pth``) and ``accelerate`` (``random_states_N.pkl``) save, where they
    save them (a file of that name elsewhere is held to the default). Both load them with
    ``torch.load(weights_only=True)`` plus an allow-list of exactly these numpy globals (see
    ``transformers.trainer_pt_utils.safe_globals`` and ``accelerate.utils.other
    .TORCH_SAFE_GLOBALS``): ``numpy._core.multiarray._reconstruct`` (``numpy.core`` before numpy
    2), ``numpy.ndarray``, ``numpy.dtype`` and ``numpy.dtypes.UInt32DType``. The scan accepts
    those and nothing else, each built the way numpy builds it (a dtype is a plain numeric one: an
    object array would unpickle whatever it holds); everything nested inside is still scanned.
``untrusted``
    files no framework loads when it resumes, which are real arbitrary-object pickles: the Hugging
    Face ``training_args.bin`` (a pickled ``TrainingArguments``). They are carried, marked
    untrusted in the manifest, and named in one line by ``init``, ``verify``, ``unpack`` and
    ``inspect``; aptbundle never loads them, and ``--strict`` refuses them.

``composer``
    Composer's ``ep{E}-ba{B}-rank{R}.pt``: also ``datetime.timedelta`` (built from numbers only),
    ``torch.torch_version.TorchVersion`` (from one string) and the numpy RNG classes above.

Plain ``pathlib`` paths (``PosixPath(...)`` built from strings, as DCP's ``.metadata`` and
Lightning's hyper-parameters record them) are harmless to construct and allowed everywhere.
"""

from __future__ import annotations

import re

DEFAULT, NUMPY_RNG, UNTRUSTED, COMPOSER = "default", "numpy-rng", "untrusted", "composer"

NUMPY_RNG_GLOBALS = frozenset({
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray",
    "numpy.dtype", "numpy.dtypes.UInt32DType",
})
# where each framework writes them: the Trainer inside checkpoint-N/, accelerate in its state folder
_RNG = re.compile(r"(^|/)(checkpoint-\d+/rng_state(_\d+)?\.pth|random_states_\d+\.pkl)$")
_UNTRUSTED = re.compile(r"(^|/)training_args\.bin$")
# Composer's checkpoints (ep{E}-ba{B}-rank{R}.pt), which it loads with a full unpickler: the state's
# Timestamp holds datetime.timedelta values, the versions a torch TorchVersion (a str), the RNG
# numpy's state; all harmless to build, each checked as it is built (``pickles``)
_COMPOSER = re.compile(r"(^|/)ep\d{1,9}-ba\d{1,12}-rank\d{1,6}\.pt$")
COMPOSER_GLOBALS = NUMPY_RNG_GLOBALS | {"datetime.timedelta", "torch.torch_version.TorchVersion"}

UNTRUSTED_NOTE = "never loaded by aptbundle; do not torch.load it without weights_only"


def policy_for(rel: str) -> str:
    """The policy of the file at ``rel`` (a run-relative path)."""
    if _RNG.search(rel):
        return NUMPY_RNG
    if _UNTRUSTED.search(rel):
        return UNTRUSTED
    if _COMPOSER.search(rel):
        return COMPOSER
    return DEFAULT


def extra_globals(rel: str) -> frozenset[str]:
    """Globals the scan accepts in this file beyond the ``weights_only`` allow-list."""
    return {NUMPY_RNG: NUMPY_RNG_GLOBALS, COMPOSER: COMPOSER_GLOBALS}.get(policy_for(rel), frozenset())

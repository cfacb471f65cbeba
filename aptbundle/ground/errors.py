"""The exception tree of aptbundle.

Every error a user can cause is an ``AptBundleError``. Its message names the file or member,
what was expected, what was found and what to do, so the CLI can print it as one line and
exit 1 without a traceback. ``VerifyError`` carries every problem found, not just the first.
"""

from __future__ import annotations


class AptBundleError(Exception):
    """Base of every error aptbundle raises for a problem with the user's input or disk."""


class UnsafePathError(AptBundleError):
    """A path breaks the portable-path rules (see ``aptbundle.ground.paths``)."""


class ManifestError(AptBundleError):
    """``aptrun.json`` is missing, unreadable or does not follow the format."""


class RunError(AptBundleError):
    """A run directory cannot be opened or written as asked."""


class RunLockedError(RunError):
    """Another process is writing to the run."""


class CheckpointError(AptBundleError):
    """A checkpoint cannot be saved or loaded."""


class ArchiveError(AptBundleError):
    """An archive is malformed, unsafe, or does not match its manifest."""


class SourceError(ArchiveError):
    """An archive cannot be opened at all: missing, a folder, empty, an unusable URL."""


class UnsafeContentError(AptBundleError):
    """A file would run code or read out of bounds if loaded (pickle globals, bad safetensors)."""


class ResumeError(AptBundleError):
    """A run cannot be continued as asked."""


class FrameworkRun(ResumeError):
    """Not a failure: the run belongs to another framework, which continues it; the message is
    that framework's own call (``aptbundle resume`` prints it and exits 3)."""


class VerifyError(AptBundleError):
    """One or more files do not match the manifest. ``problems`` lists every one of them."""

    def __init__(self, problems: list, what: str = "run", hint: str | None = None):
        self.problems = list(problems)
        self.what = what  # what was checked, for the summary line
        self.hint = hint  # what to do about them, when it is known
        lines = "; ".join(str(p) for p in self.problems[:5])
        more = f" (and {len(self.problems) - 5} more)" if len(self.problems) > 5 else ""
        super().__init__(f"{what} failed verification: {lines}{more}")


class SignatureError(AptBundleError):
    """A signature is missing, unreadable, by a key not trusted, or for another run."""


class MaterializeError(AptBundleError):
    """A run cannot be made to appear at its destination: no room, or something of the user's there."""


class StoreError(AptBundleError):
    """A run store cannot be read or written as asked, or holds what it should not."""


class StoreLayoutError(StoreError):
    """A store holds a link, a folder or a special file where its layout has an object: it is
    damaged or crafted, and every command refuses it as a whole."""

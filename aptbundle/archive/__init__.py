"""The archive: one verified ``NAME.aptrun.tar.zst`` per run.

``tarstream`` (a strict tar writer and reader, one zstd frame), ``codec`` (the ``--dense``
per-member transform), ``writer`` (``pack``), ``reader`` (the one ``ArchiveReader``),
``extract`` (``unpack`` and ``verify_archive``, loops over the reader) and ``storage`` (local
paths and fsspec URLs). Nothing here imports torch.
"""

from aptbundle.archive.extract import unpack, verify_archive
from aptbundle.archive.reader import ArchiveReader, read_archive_manifest
from aptbundle.archive.storage import SUFFIX, archive_name
from aptbundle.archive.writer import PackResult, pack, select_checkpoints

__all__ = ["SUFFIX", "ArchiveReader", "PackResult", "archive_name", "pack", "read_archive_manifest",
           "select_checkpoints", "unpack", "verify_archive"]

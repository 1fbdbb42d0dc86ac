"""Every error reembed raises on purpose, under one base.

A :class:`ReembedError` is a user-facing failure: its message names the file, row, key or URI, the cause
and what to do. The CLI prints it as one line, ``reembed: error: ...``, and exits with the error's
``exit_code``; it shows the traceback only with ``-v``. Anything else that escapes is a bug in reembed.

Exit codes tell "failed" from "refused":

* ``EXIT_FAILED`` (1): something went wrong (a file, the network, the model, a gate that did not pass);
* ``EXIT_USAGE`` (2): the command line or a config file asks for something invalid;
* ``EXIT_REFUSED`` (3): reembed refused to act, to protect what exists (a swap to an unfit collection,
  another job's output, a write that would replace someone else's); nothing was changed, and the message
  names the flag or target that lets you go on.
"""

from __future__ import annotations

EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED = 1, 2, 3


class ReembedError(Exception):
    """Base of every error reembed raises for a user to act on."""

    exit_code = EXIT_FAILED


class UsageError(ReembedError):
    """The command line or a config file asks for something invalid (exit 2)."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError, ValueError):
    """A setting is unknown, mistyped or out of range. The message names the key and its source."""


class InputError(ReembedError, ValueError):
    """The input cannot be used as it is (a missing column, a corrupt file). The message names the file."""


class StorageError(ReembedError):
    """A URI cannot be reached, listed, read or written. The message names the URI and the likely cause."""


class ObjectExistsError(StorageError):
    """A create-only write found an object already at the key (another job wrote it): refused (exit 3)."""

    exit_code = EXIT_REFUSED


class VersionConflict(StorageError):
    """A conditional write found the object changed (or created) since the version this process holds:
    refused (exit 3)."""

    exit_code = EXIT_REFUSED


class ChecksumError(StorageError):
    """A file's bytes do not match the sha256 recorded for it (in the manifest or a commit record)."""


class ManifestError(ReembedError):
    """The output's manifest refuses this job (fingerprint mismatch, corrupt file, ...)."""


class ConcurrentWriteError(ManifestError):
    """Another job changed the manifest since this one read it: this job is fenced (exit 3)."""

    exit_code = EXIT_REFUSED


class ModelLoadError(ReembedError):
    """The model cannot be loaded; the message says why and how to fix it."""


class OnnxUnavailable(ModelLoadError):
    """This model or machine cannot use the ONNX Runtime backend; the message says why."""


class QdrantError(ReembedError):
    """A Qdrant target cannot be used as asked; the message names the target or collection."""


class SwapRefused(QdrantError):
    """A swap or rollback was refused; the alias was not touched (exit 3)."""

    exit_code = EXIT_REFUSED


class ValidationError(ReembedError, ValueError):
    """A validation input (queries file, pairs file, old store, model) is unusable; names the file/line."""


class ExportError(ReembedError):
    """The source cannot be exported (bad URI, missing collection, inconsistent vectors, ...)."""


class MigrationError(ReembedError):
    """A store cannot be opened, searched or written as asked; the message says which and why."""


class DualWriteError(MigrationError):
    """The old store was written but the new one was not. Upserts are idempotent: retry the same call."""


class PriceError(ReembedError, ValueError):
    """A run cannot be priced: the message names the run and the price that is missing."""


class OutputRefused(ManifestError):
    """This output refuses the job as asked: made with another model or embedding setting, or planned with
    other input settings. Nothing was changed; use another --output, or --fresh (exit 3)."""

    exit_code = EXIT_REFUSED


class InputChanged(InputError):
    """A resume refused: a file of the input was modified or removed since the plan was made (exit 3). The
    message names the file; re-plan with --fresh or restore it."""

    exit_code = EXIT_REFUSED


class LiveRunError(ConcurrentWriteError):
    """Another run holds this output (its heartbeat in ``_live.json`` is fresh); names it and what to do."""

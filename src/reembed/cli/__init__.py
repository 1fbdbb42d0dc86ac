"""The ``reembed`` command: parses arguments, then calls the library, one module per group of subcommands.

The CLI owns user-facing output. A :class:`~reembed.errors.ReembedError` (the user's mistake or the
world's: a missing file, a refused swap, an unreachable server) is printed as one line, ``reembed: error:
...``, with exit 1 (2 for usage); ``-v`` adds the traceback. Errors raised inside Ray tasks are unwrapped
to the error the task raised. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import traceback
from typing import Any

from reembed.errors import ReembedError

log = logging.getLogger("reembed")

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_PIPE, EXIT_INTERRUPTED = 0, 1, 2, 141, 130

# One module per group of subcommands, each with ``register(subparsers)``.
COMMAND_MODULES = (
    "reembed.cli.run",        # run, status
    "reembed.cli.indexes",    # index, versions, swap, rollback, search
    "reembed.cli.migrate",    # export, validate, query
    "reembed.cli.tune",       # tune
    "reembed.cli.cost",       # cost
    "reembed.cli.adapter",    # adapter fit, adapter show
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", 0) - getattr(args, "quiet", 0)
    setup_logging(verbose)
    log.debug("reembed %s, Python %s, command %s", _version(), sys.version.split()[0], args.command)
    try:
        return args.func(args) or EXIT_OK
    except KeyboardInterrupt:
        print("reembed: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return _closed_stdout()
    except Exception as e:  # noqa: BLE001 - the CLI decides what a user sees
        err = user_error(e)
        if err is None:
            raise
        print(f"reembed: error: {one_line(err)}", file=sys.stderr)
        if verbose > 0:
            traceback.print_exception(e, file=sys.stderr)
        return getattr(err, "exit_code", EXIT_FAIL)


def _version() -> str:
    from reembed import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:

    p = argparse.ArgumentParser(
        prog="reembed",
        description="Re-embed a document corpus with a new embedding model on Ray: sharded, resumable output "
                    "with a checkpoint manifest.",
    )
    p.add_argument("--version", action="version", version=f"reembed {_version()}")
    _verbosity(p, argparse.SUPPRESS)
    p.set_defaults(verbose=0, quiet=0)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for command in sub.choices.values():
        _verbosity(command, argparse.SUPPRESS)
    return p


def _verbosity(p: argparse.ArgumentParser, default: Any) -> None:
    # -v / -q are accepted before and after the subcommand; SUPPRESS keeps a subcommand's default from
    # overwriting what was given before it.
    p.add_argument("-v", "--verbose", action="count", default=default,
                   help="more logging (-vv for debug); with an error, also its traceback")
    p.add_argument("-q", "--quiet", action="count", default=default, help="less logging: warnings and errors only")


def user_error(e: BaseException) -> BaseException | None:
    """The error a user should see for ``e``: a ReembedError found in ``e`` or what it wraps (Ray's
    ``RayTaskError`` keeps the task's exception as ``cause``; Ray Data chains it), or an OS error on a file
    the user named. None for a bug."""
    chain = list(_chain(e))
    for kinds in (ReembedError, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        for err in chain:
            if isinstance(err, kinds) and not isinstance(getattr(err, "cause", None), BaseException):
                return err
    return None


def one_line(e: BaseException) -> str:
    """The message of ``e`` as one line: ANSI colours stripped, whitespace collapsed, length bounded."""
    if isinstance(e, OSError) and e.filename and not isinstance(e, ReembedError):
        text = f"{e.filename}: {e.strerror or e}"
    else:
        text = str(e) or type(e).__name__
    text = " ".join(_ANSI.sub("", text).split())
    return text if len(text) <= 2000 else text[:2000] + " ..."


def setup_logging(verbose: int) -> None:
    """Log level from -v/-q. Libraries that log request headers or credentials at DEBUG (botocore, urllib3,
    httpx) stay at INFO or above even with -vv, and every record passes a filter that masks secrets."""
    level = logging.WARNING if verbose < 0 else logging.INFO if verbose < 2 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr,
                        force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactSecrets())
    for noisy in ("urllib3", "filelock", "httpx", "httpcore", "sentence_transformers", "transformers", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for chatty in ("botocore", "boto3", "s3transfer", "grpc", "qdrant_client"):
        logging.getLogger(chatty).setLevel(max(level, logging.INFO))


class RedactSecrets(logging.Filter):
    """Masks credential values (from the environment) and credential-shaped strings in log records."""

    PATTERNS = (
        re.compile(r"(?i)(x-amz-security-token|x-amz-credential|authorization|api[-_]key|aws_secret_access_key|"
                   r"aws_session_token|aws_access_key_id)([\"']?\s*[:=]\s*[\"']?)([^\s,\"'}]+)"),
        re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),
        re.compile(r"(Credential=)[^/,\s]+"),
    )
    ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "QDRANT_API_KEY",
           "PINECONE_API_KEY", "WEAVIATE_API_KEY")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


def redact(text: str) -> str:
    for name in RedactSecrets.ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    p_header, p_key, p_cred = RedactSecrets.PATTERNS
    text = p_header.sub(lambda m: m.group(1) + m.group(2) + "***", text)
    text = p_key.sub("***", text)
    return p_cred.sub(r"\1***", text)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _chain(e: BaseException | None):
    """``e`` and what it wraps: a Ray wrapper's ``cause``, ``raise ... from``, or the error being handled."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        inner = getattr(e, "cause", None)
        if isinstance(inner, BaseException):
            e = inner
        else:
            e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)


def _closed_stdout() -> int:
    """The reader of our stdout went away (``reembed status | head``): stop quietly, as a SIGPIPE would."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    return EXIT_PIPE


def print_or_json(summary: Any, as_json: bool, text: str) -> None:
    """Print ``summary`` as JSON (``--json``) or ``text``."""
    import json

    print(json.dumps(summary, indent=1, default=str) if as_json else text)


if __name__ == "__main__":
    sys.exit(main())

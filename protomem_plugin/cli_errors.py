"""How every protomem command line reports errors (``protomem-train``, ``protomem-eval-ijb``,
``protomem-export`` and the scripts in ``tools/``).

The rule:

* **User errors** (bad input: a missing or wrong file, a bad parameter or config key, a malformed
  dataset, benchmark or model file) print ONE line on stderr, ``<prog>: <message>``, and exit with
  code 2 (argparse's code for bad usage). No traceback; ``--verbose`` prints it above the line.
  User errors are: :class:`ValueError` and its subclasses, which include all of the project's
  input errors (``ConfigError``, ``RecordIOError``, ``IJBFormatError``, ``UnsafePickleError``,
  ``OnnxContractError``, ``CheckpointError``, :class:`json.JSONDecodeError`, ...), and the
  path errors :class:`FileNotFoundError`, :class:`FileExistsError`, :class:`NotADirectoryError`,
  :class:`IsADirectoryError` and :class:`PermissionError`. Library code that rejects input raises
  one of these with a message naming the file, key or parameter at fault.
* **A checkpoint that cannot be written** (``CheckpointWriteError``: a full disk, a file-size limit)
  is reported the same way, one line and exit code 2: the message names the file and the cause, and
  the previous checkpoint is kept.
* **Failures of a run that started fine** are not user errors even though some subclass
  ValueError: a training that diverges (``NonFiniteEmbeddingError``, ``NonFinitePrototypeError``,
  ``NonFiniteLossError``) keeps its traceback.
* **Everything else** is unexpected (a bug, an out-of-memory, a broken installation): the
  traceback is printed as Python does and the exit code is 1.
* Ctrl-C prints ``<prog>: interrupted`` and exits with 130.
* Argument errors found by argparse are one line too (``<prog>: <message> (see --help)``), exit 2.

Entry points use :func:`cli_entry` (a decorator for ``main(argv=None)``) and
:func:`add_cli_arguments` on their parser. Run as a program (``argv`` is None: console scripts and
``python tools/x.py``), errors are reported as above; called from Python with an argument list,
``main(argv)`` raises the library's exceptions like any function. :func:`report_error` prints one
error the same way, for a CLI that handles an error itself.
"""

from __future__ import annotations

import argparse
import functools
import sys
import traceback
from typing import Callable, Sequence

__all__ = [
    "USER_ERRORS",
    "add_cli_arguments",
    "cli_entry",
    "error_message",
    "is_user_error",
    "report_error",
    "run_cli",
]

#: Exception types reported as one line with exit code 2 (see the module docstring).
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)

# (module, class) of ValueError subclasses that report a failed run, not bad input; looked up in
# sys.modules so that this module imports nothing heavy (an exception of a class whose module was
# never imported cannot occur).
_RUN_FAILURES = (
    ("protomem_plugin.heads.base", "NonFiniteEmbeddingError"),
    ("protomem_plugin.heads.prototype_memory", "NonFinitePrototypeError"),
)

# (module, class) of errors that are not bad input but that a user fixes without a traceback (a full
# disk): one line and exit code 2 as well
_ONE_LINE_FAILURES = (
    ("protomem_plugin.train.checkpoint", "CheckpointWriteError"),
)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is reported as one line with exit code 2."""
    for module_name, class_name in _ONE_LINE_FAILURES:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    if not isinstance(exc, USER_ERRORS):
        return False
    for module_name, class_name in _RUN_FAILURES:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if cls is not None and isinstance(exc, cls):
            return False
    return True


def error_message(exc: BaseException) -> str:
    """The exception's message on one line (an OSError as ``<reason>: <file>``)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.strerror}: {exc.filename}"
    else:
        text = str(exc)
    text = " ".join(text.split())
    return text or type(exc).__name__


def report_error(prog: str, exc: BaseException, verbose: bool = False) -> int:
    """Print ``exc`` as ``<prog>: <message>`` on stderr (its traceback first if ``verbose``); returns 2."""
    if verbose:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(f"{prog}: {error_message(exc)}", file=sys.stderr)
    return EXIT_USER_ERROR


def _wants_verbose(argv: Sequence[str]) -> bool:
    args = list(argv)
    if "--" in args:
        args = args[: args.index("--")]
    return "--verbose" in args


def run_cli(prog: str, main_fn: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main_fn(argv)`` (default ``sys.argv[1:]``) as a program: user errors become one line
    on stderr and exit code 2, Ctrl-C exit code 130; other exceptions propagate (traceback, exit 1).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = main_fn(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - sorted into user errors and the rest just below
        if not is_user_error(exc):
            raise
        return report_error(prog, exc, _wants_verbose(args))
    return 0 if code is None else int(code)


def cli_entry(prog: str) -> Callable[[Callable[[list[str] | None], int]], Callable[[list[str] | None], int]]:
    """Decorator for a CLI's ``main(argv=None)``: as a program (``argv`` None) it runs under
    :func:`run_cli`; called with an argument list it raises the library's exceptions.
    """

    def decorate(fn: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
        @functools.wraps(fn)
        def main(argv: list[str] | None = None) -> int:
            if argv is None:
                return run_cli(prog, fn, sys.argv[1:])
            return fn(argv)

        return main

    return decorate


def _one_line_error(parser: argparse.ArgumentParser, message: str) -> None:
    parser.exit(EXIT_USER_ERROR, f"{parser.prog}: {' '.join(message.split())} (see --help)\n")


def add_cli_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--verbose`` and make argparse's own errors one line (exit code 2); returns ``parser``."""
    parser.add_argument("--verbose", action="store_true", help="on an error, also print the traceback")
    parser.error = functools.partial(_one_line_error, parser)  # type: ignore[method-assign]
    return parser

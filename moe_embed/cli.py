"""Plumbing shared by the launchers: one-line errors, output checks before work, atomic writes.

A launcher calls `cli.run(main)` in place of `absl.app.run(main)`. Expected
failures (a bad config field or argument, a missing or unreadable file, a
malformed record, a damaged checkpoint) then end with one line on stderr and
exit code 1; the traceback is printed only with --verbosity=1 or
MOE_EMBED_TRACEBACK=1.
"""

from __future__ import annotations

import ast
import contextlib
import os
import sys
import tempfile
from typing import Callable, Iterator

from absl import app
from absl import flags
from etils import epath

from moe_embed import storage

# Exit code of a run stopped by SIGTERM after saving a checkpoint: 128 + SIGTERM,
# what a shell reports for a process ended by that signal. Schedulers treat it as
# "preempted": rerun the same command to resume.
EXIT_PREEMPTED = 143
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C, after saving where a run can save.
TRACEBACK_ENV = "MOE_EMBED_TRACEBACK"


class UserError(Exception):
  """A failure whose message says what to change; printed as one line."""


def one_line(error: BaseException) -> str:
  """The message of `error` on one line, without the quoting KeyError adds."""
  message = str(error)
  if len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
    try:
      message = ast.literal_eval(message)
    except (ValueError, SyntaxError):
      message = message[1:-1]
    message = str(message)
  message = " ".join(part.strip() for part in message.splitlines() if part.strip())
  return message or type(error).__name__


def _verbose() -> bool:
  if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
    return True
  try:
    return flags.FLAGS["verbosity"].value >= 1
  except (KeyError, flags.UnparsedFlagAccessError):
    return False


def _expected_errors() -> tuple[type[BaseException], ...]:
  errors: list[type[BaseException]] = [UserError, OSError, ValueError, KeyError,
                                       AttributeError, UnicodeDecodeError]
  with contextlib.suppress(ImportError):
    from safetensors import SafetensorError
    errors.append(SafetensorError)
  # Errors of modules too heavy to import here, once a launcher has imported them.
  for module, names in (("moe_embed.io.checkpoints", ("CheckpointError",)),):
    if module in sys.modules:
      errors.extend(getattr(sys.modules[module], n) for n in names)
  return tuple(errors)


def quiet() -> bool:
  """Whether expected failures are one line (no --verbosity=1, no MOE_EMBED_TRACEBACK)."""
  return not _verbose()


def _fail(error: BaseException, what: str = "Error") -> None:
  if _verbose():
    raise error
  print(f"{what}: {one_line(error)} (--verbosity=1 shows the traceback)", file=sys.stderr)
  sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config-file and flag errors as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"Flag error: {one_line(e)}", file=sys.stderr)
    sys.exit(1)
  except _expected_errors() as e:  # Raised while loading a --config file.
    # The root cause of a chained error is the one that names the field.
    while e.__context__ is not None and isinstance(e.__context__, _expected_errors()):
      if "Did you mean" in str(e) or "Unknown" in str(e):
        break
      e = e.__context__
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
      raise
    print(f"Config error: {one_line(e)}", file=sys.stderr)
    sys.exit(1)


def run(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run(main)` with expected failures as one line and exit code 1."""

  def guarded(argv):
    try:
      return main(argv)
    except _expected_errors() as e:
      _fail(e)
    except KeyboardInterrupt:
      if _verbose():
        raise
      print("Interrupted (Ctrl-C).", file=sys.stderr)
      sys.exit(EXIT_INTERRUPTED)

  app.run(guarded, flags_parser=_parse_flags)


def check_output_file(path: str, flag: str | None = None, make_parent: bool = True) -> None:
  """Checks before any work that `path` can be written; makes its parent folder.

  A gs:// output is checked for its bucket (a missing one fails here, not after
  the work); object stores have no folders to make or permissions to test.
  `flag` names the output in errors as `--flag=path`; `make_parent=False`
  requires the local parent folder to exist instead of making it.
  """
  name = f"--{flag}={path}" if flag else f"Output {path}"
  if storage.is_remote(path):
    _check_bucket(path)
    if epath.Path(path).is_dir():
      raise UserError(f"{name} is a folder; give a file path.")
    return
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise UserError(f"{name} is a folder; give a file path.")
  if not make_parent and not os.path.isdir(parent):
    raise UserError(f"{name}: folder {parent} does not exist.")
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise UserError(f"Cannot create the output folder {parent}: {e.strerror}.") from None
  if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
    raise UserError(f"{name} cannot be written: permission denied; choose another output.")


def check_output_folder(path: str) -> None:
  """Checks a folder output can be written before any work: its bucket, or its local parent."""
  if storage.is_remote(path):
    _check_bucket(path)
    return
  parent = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise UserError(f"Cannot create the folder {parent}: {e.strerror}.") from None


def _check_bucket(path: str) -> None:
  try:
    storage.check_bucket(path)
  except FileNotFoundError as e:
    raise UserError(str(e)) from None


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a local temporary path; moved onto `path` only if the block succeeds.

  Locally the file is written beside `path` and renamed; a gs:// object is
  uploaded whole once written (an object appears at once or not at all).
  """
  remote = storage.is_remote(path)
  parent = None if remote else os.path.dirname(os.path.abspath(path))
  name = os.path.basename(path.rstrip("/"))
  fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{name}.", suffix=".tmp")
  os.close(fd)
  try:
    yield tmp
    if remote:
      epath.Path(tmp).copy(path, overwrite=True)
    else:
      storage.public_mode(tmp)  # mkstemp makes it 0600; the output follows the umask.
      os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def resolve_config_path(argv: list[str]) -> list[str]:
  """Lets `--config=configs/x.py:arg` work from any directory, not only the repo root."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # Holds configs/.
  out = []
  for arg in argv:
    if arg.startswith("--config=") and not arg.startswith("--config.="):
      path, sep, rest = arg[len("--config="):].partition(":")
      if not os.path.exists(path) and os.path.exists(os.path.join(repo, path)):
        arg = "--config=" + os.path.join(repo, path) + sep + rest
    out.append(arg)
  return out

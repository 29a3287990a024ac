"""User errors and the one path every command line takes with them.

A SanaError is something the user can fix (bad input, a damaged checkpoint, a bad flag). Library code
raises it in the API's own words (`guidance_scale`, `num_inference_steps`); a command line adds its
flag names. Every entry point (sample.py, train.py, `python -m sana_jax...`) is wrapped by `cli_main`:
a SanaError becomes `error: MESSAGE` on one line and exit status 2, never a traceback; SIGTERM and
Ctrl-C unwind through `finally` blocks, so temporary files are removed on the way out.
"""
import argparse
import contextlib
import functools
import signal
import sys
import threading

MAX_MESSAGE = 300  # characters of a printed error; a message is never a dump of a huge value


class SanaError(Exception):
  """Bad input or a bad checkpoint: something the user can fix, not a bug."""


def one_line(message, limit=MAX_MESSAGE):
  """`message` on one line, cut to `limit` characters."""
  text = " ".join(str(message).split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def short(value, limit=60):
  """repr(value) cut to `limit` characters, for quoting user input inside a message."""
  return one_line(repr(value), limit)


def report(error):
  """Prints a user error as the CLIs do; returns exit status 2."""
  print(f"error: {one_line(error)}", file=sys.stderr)
  return 2


def warn(message):
  """Something the user should know that does not stop the run: one line `warning: ...` on stderr."""
  print(f"warning: {one_line(message)}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def terminate_as_exit():
  """Inside: SIGTERM raises SystemExit(143) instead of killing the process, so `finally` blocks and
  context managers (temporary files, atomic directories) clean up. Main thread only."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handler(signum, frame):
    raise SystemExit(128 + signum)

  previous = signal.signal(signal.SIGTERM, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def cli_main(main):
  """Wraps a command-line main(argv) -> exit status: a SanaError is one line on stderr and status 2;
  Ctrl-C is status 130 and SIGTERM 143, both after cleaning up."""
  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      with terminate_as_exit():
        return main(*args, **kwargs)
    except SanaError as e:
      return report(e)
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr)
      return 130
  return wrapped


class ArgumentParser(argparse.ArgumentParser):
  """Raises a parse error as a SanaError, so `cli_main` prints it as one line with status 2."""

  def error(self, message):
    raise SanaError(message)

"""The one exception type for user errors: the CLIs turn it into a one-line message and exit status 2."""
import argparse
import functools
import sys


class SanaError(Exception):
  """Bad input or a bad checkpoint: something the user can fix, not a bug."""


def cli_main(main):
  """Wraps a command-line main(argv) -> exit status: a SanaError becomes `error: MESSAGE` on stderr
  and status 2, never a traceback."""
  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except SanaError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  return wrapped


class ArgumentParser(argparse.ArgumentParser):
  """Raises a parse error as a SanaError, so `cli_main` prints it as one line with status 2."""

  def error(self, message):
    raise SanaError(message)

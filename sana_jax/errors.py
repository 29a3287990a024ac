"""The one exception type for user errors: the CLIs turn it into a one-line message and exit status 2."""


class SanaError(Exception):
  """Bad input or a bad checkpoint: something the user can fix, not a bug."""

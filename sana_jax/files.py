"""Files from users and files for users, through one set of helpers.

Reading: a model directory, a config or a prompt file is untrusted. Paths named inside it stay inside
it (`inside`), only regular files are opened (`regular_file`: never a FIFO that hangs, a device or a
directory), JSON is bounded and must be an object (`read_json`); every problem is a one-line SanaError
naming the file.

Writing: an output appears whole or not at all. `atomic_write` creates its temporary file exclusively
beside the target (never through an existing file or link), syncs it and renames it into place; on any
exit, SIGTERM and Ctrl-C included (see errors.cli_main), the temporary file is removed.
`atomic_directory` does the same for a directory of files.
"""
import contextlib
import json
import os
import secrets
import shutil
import stat

from sana_jax.errors import SanaError, short

MAX_JSON_BYTES = 16 << 20  # config.json of the largest released models is a few KB; an index a few MB


def regular_file(path, what="file"):
  """`path` if it is a regular file (symlinks followed); else a SanaError saying what it is."""
  try:
    mode = os.stat(path).st_mode
  except FileNotFoundError:
    raise SanaError(f"{what} {path} does not exist") from None
  except OSError as e:  # a symlink loop, a name too long, no permission
    raise SanaError(f"{what} {path}: {e.strerror}") from None
  if not stat.S_ISREG(mode):
    kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
    raise SanaError(f"{what} {path} is {kind}")
  return path


def inside(root, name, what="file"):
  """root/name for a relative `name` read from a user's file (a shard index, model_index.json): no
  absolute path, no `..`, and with symlinks resolved still inside `root` (for a hub snapshot: inside its
  repository in the cache, whose files are links into the repository's blobs/)."""
  if not isinstance(name, str) or not name or "\0" in name:
    raise SanaError(f"{root}: {what} name {short(name)} is not a file name")
  parts = name.replace("\\", "/").split("/")
  if os.path.isabs(name) or name.startswith("~") or ".." in parts:
    raise SanaError(f"{root}: {what} {short(name)} points outside the directory")
  path = os.path.join(root, name)
  bound, real = _containment_root(root), os.path.realpath(path)
  if os.path.commonpath([bound, real]) != bound:
    raise SanaError(f"{root}: {what} {short(name)} leads outside the directory (through a symlink)")
  return path


def _containment_root(root):
  real = os.path.realpath(root)
  parts = real.split(os.sep)
  if "snapshots" in parts[:-1] and parts[parts.index("snapshots") - 1].startswith("models--"):
    return os.sep.join(parts[:parts.index("snapshots")])  # .../models--org--name
  return real


def read_json(path, what="JSON file", *, max_bytes=MAX_JSON_BYTES):
  """The JSON object in `path`: a regular file of at most `max_bytes`, UTF-8, an object at the top."""
  regular_file(path, what)
  try:
    with open(path, "rb") as f:
      raw = f.read(max_bytes + 1)
  except OSError as e:
    raise SanaError(f"{what} {path}: {e.strerror}") from None
  if len(raw) > max_bytes:
    raise SanaError(f"{what} {path} is larger than {max_bytes >> 20} MB; not a config this project reads")
  try:
    value = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError:
    raise SanaError(f"{what} {path} is not UTF-8 text") from None
  except json.JSONDecodeError as e:
    raise SanaError(f"{what} {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
  except RecursionError:
    raise SanaError(f"{what} {path} is nested too deeply") from None
  if not isinstance(value, dict):
    raise SanaError(f"{what} {path} holds a JSON {type(value).__name__}, expected an object")
  return value


def read_text(path, what="text file", *, max_bytes=64 << 20):
  """UTF-8 text of a file, a pipe or standard input ('-'), bounded; undecodable text is a SanaError."""
  try:
    if path == "-":
      import sys
      raw = sys.stdin.buffer.read(max_bytes + 1)
    else:
      if os.path.isdir(path):
        raise SanaError(f"{what} {path} is a directory")
      with open(path, "rb") as f:  # a pipe or process substitution is fine: read to its end
        raw = f.read(max_bytes + 1)
  except FileNotFoundError:
    raise SanaError(f"{what} {path} does not exist") from None
  except OSError as e:
    raise SanaError(f"{what} {path}: {e.strerror}") from None
  if len(raw) > max_bytes:
    raise SanaError(f"{what} {path} is larger than {max_bytes >> 20} MB")
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise SanaError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None


# ---------------------------------------------------------------------------------------------
# writing


def _temporary(directory, base):
  """A new file in `directory`, created exclusively: (fd, path)."""
  flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
  for _ in range(100):
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.part")
    try:
      return os.open(tmp, flags, 0o644), tmp
    except FileExistsError:
      continue
  raise SanaError(f"cannot create a temporary file in {directory}")


@contextlib.contextmanager
def atomic_write(path, mode="wb", encoding=None):
  """`with atomic_write(path) as f:` write to f; on success the file becomes `path` (an existing file
  or link there is replaced, never written through); on any exception nothing is left behind."""
  path = os.path.abspath(os.fspath(path))
  directory, base = os.path.split(path)
  fd, tmp = _temporary(directory, base)
  try:
    with os.fdopen(fd, mode, encoding=encoding) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def write_json(path, value, *, indent=2, sort_keys=False):
  with atomic_write(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=indent, sort_keys=sort_keys)
    f.write("\n")


def write_image(path, image, **save_kwargs):
  """A PIL image to `path` (format from the extension), atomically."""
  from PIL import Image
  fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG")
  with atomic_write(path) as f:
    image.save(f, format=fmt, **save_kwargs)


def _fsync_tree(directory):
  for root, _, names in os.walk(directory):
    for name in names:
      with open(os.path.join(root, name), "rb") as f:
        os.fsync(f.fileno())
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_directory(path, replaceable=lambda path: True):
  """`with atomic_directory(path) as tmp:` write into tmp, a fresh sibling of `path`; on success tmp
  becomes `path` by renames (an existing directory, if `replaceable(path)` allows, is moved aside first,
  then deleted); on failure tmp is removed. `path` is always absent or whole, never half-written."""
  path = os.path.abspath(os.fspath(path))
  parent, base = os.path.split(path)
  if os.path.lexists(path):
    if not os.path.isdir(path) or os.path.islink(path):
      raise SanaError(f"cannot write to {path}: it exists and is not a directory")
    replaceable(path)
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise SanaError(f"cannot create {parent}: {e.strerror}") from None
  tmp, old = (os.path.join(parent, f".{base}.{kind}-{secrets.token_hex(6)}") for kind in ("tmp", "old"))
  try:
    os.mkdir(tmp)  # not tempfile.mkdtemp: its 0o700 mode would stick to the published directory
  except OSError as e:
    raise SanaError(f"cannot write to {path}: {e.strerror}") from None
  try:
    yield tmp
    _fsync_tree(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.lexists(path):
    os.rename(path, old)
  os.rename(tmp, path)
  shutil.rmtree(old, ignore_errors=True)


def output_directory(path, what="output directory", *, create=True):
  """Checks that files can be written to `path` (an existing writable directory, or one that can be
  made under the nearest existing parent) and creates it when `create`. Call it before any model is
  loaded, so a bad output location fails in a second, not after minutes; with create=False nothing
  is made until the first output is ready (a run that fails early leaves no empty directory)."""
  path = os.fspath(path)
  existing = path
  while not os.path.lexists(existing):
    parent = os.path.dirname(os.path.abspath(existing))
    if parent == os.path.abspath(existing):
      break
    existing = parent
  if not os.path.isdir(existing):
    where = path if existing == path else f"{existing} (a parent of {path})"
    raise SanaError(f"{what} {where} exists and is not a directory")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise SanaError(f"{what} {path} cannot be written: {existing} is not writable")
  if create:
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      raise SanaError(f"cannot create {what} {path}: {e.strerror}") from None
  return path

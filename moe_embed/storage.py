"""Cloud storage: every path may be `gs://bucket/...`; this module only configures the clients.

All reading and writing goes through `etils.epath` (gcsfs for `gs://`), Orbax
and TensorStore (native `gs://`) and ArrayRecord (native `gs://`), as in TFDS
and Orbax themselves. What is left here:

  use_emulator   points every one of those clients at STORAGE_EMULATOR_HOST, the
                 variable the Google client libraries read, when it is set
  is_remote      whether a path names an object store rather than a local file
  absolute       a local path made absolute; a URI unchanged
  write_atomic   replace a file's content whole: a reader sees the old or the new
  public_mode    give a file or folder written through a private temporary (mkstemp,
                 mkdtemp, safetensors) the mode the umask gives a new file
  check_bucket   fail at once, naming the path, when a URI's bucket is missing
  walk_files     every file under a folder, as paths that keep the folder's scheme

`moe_embed/__init__.py` calls `use_emulator()` on import, before any client starts.
"""

from __future__ import annotations

import os
import threading

from etils import epath

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"


def use_emulator() -> None:
  """With STORAGE_EMULATOR_HOST set, sends gcsfs, TensorStore and ArrayRecord there too.

  gcsfs and google-cloud-storage read the variable themselves; TensorStore reads
  TENSORSTORE_GCS_HTTP_URL and ArrayRecord's C++ client reads
  CLOUD_STORAGE_EMULATOR_ENDPOINT. gcsfs's bucket-layout probe uses the gRPC
  control plane, which an emulator does not serve, so it is switched off.
  Variables the user set are left alone.
  """
  host = os.environ.get(EMULATOR_ENV, "").strip()
  if not host:
    return
  if "://" not in host:
    host = "http://" + host
  host = host.rstrip("/")
  os.environ[EMULATOR_ENV] = host
  os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host)
  os.environ.setdefault("CLOUD_STORAGE_EMULATOR_ENDPOINT", host)
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def is_remote(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
  """`path` as an absolute local path, or unchanged when it is a URI such as gs://..."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
  """Replaces the content of `path` whole, so that a crash leaves the old or the new.

  A local file is written beside it and renamed; an object store's upload is
  already all-or-nothing (and a rename there is a copy), so it is written directly.
  """
  target = epath.Path(path)
  if is_remote(path):
    target.write_bytes(data) if isinstance(data, bytes) else target.write_text(data)
    return
  tmp = target.parent / f".{target.name}.tmp"
  tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data)
  os.replace(tmp, target)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def public_mode(path: str | os.PathLike) -> None:
  """chmod `path` (and, for a folder, everything in it) to 0666/0777 less the umask.

  Temporary files and folders are created 0600/0700, and safetensors writes
  0600 too; outputs renamed from them would keep that mode whatever the umask.
  """
  mask = _umask()
  path = os.fspath(path)
  os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)
  if os.path.isdir(path):
    for root, dirs, files in os.walk(path):
      for name in dirs:
        os.chmod(os.path.join(root, name), 0o777 & ~mask)
      for name in files:
        os.chmod(os.path.join(root, name), 0o666 & ~mask)


BUCKET_TIMEOUT_S = 15.0  # How long check_bucket waits for an object store to answer.


def walk_files(folder: str | os.PathLike) -> list[epath.Path]:
  """Every file under `folder`, sorted, each as `folder / relative path`.

  epath's `walk` on gcsfs yields folders without their `gs://` scheme, so joining
  its names would name local paths; `iterdir` keeps the scheme.
  """
  found = []
  for child in epath.Path(folder).iterdir():
    found += walk_files(child) if child.is_dir() else [child]
  return sorted(found, key=os.fspath)


def check_bucket(path: str | os.PathLike, timeout_s: float = BUCKET_TIMEOUT_S) -> None:
  """FileNotFoundError naming `path` when it is a URI whose bucket does not exist or
  does not answer within `timeout_s` (no network, a wrong endpoint).

  Called before work that writes under `path`: an object store has no folders
  to create, so a missing bucket would otherwise surface at the first write,
  and an unreachable one only after the client's minutes of retries.
  """
  path = os.fspath(path)
  if not is_remote(path):
    return
  scheme, rest = path.split("://", 1)
  bucket = f"{scheme}://{rest.split('/', 1)[0]}"
  answer: dict = {}

  def probe():
    try:
      answer["exists"] = epath.Path(bucket).exists()
    except Exception as e:  # pylint: disable=broad-except  (whatever the client raised)
      answer["error"] = e

  # The client retries for minutes; a daemon thread lets the caller give up first.
  thread = threading.Thread(target=probe, name="check-bucket", daemon=True)
  thread.start()
  thread.join(timeout_s)
  if thread.is_alive():
    raise FileNotFoundError(f"Bucket {bucket} of {path} did not answer within {timeout_s:.0f} s; "
                            "check the network, the credentials and the path.")
  if "error" in answer:
    error = answer["error"]
    reason = " ".join(str(error).split())[:200]
    raise FileNotFoundError(f"Bucket {bucket} of {path} cannot be reached "
                            f"({type(error).__name__}: {reason}); check the network, the "
                            "credentials and the path.")
  if not answer["exists"]:
    raise FileNotFoundError(f"Bucket {bucket} of {path} does not exist or cannot be read; "
                            "create it or fix the path.")

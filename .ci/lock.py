"""constraints.txt, the lock: the exact versions the test suite passed with, per Python.

  python .ci/lock.py          # write this Python's pins from its environment
  python .ci/lock.py --diff   # print where this environment differs from the lock

Run it with the interpreter of the environment the suite just passed in (`.ci/run
--newest --write-lock` does). Each pin carries a `python_version` marker, so one file
holds a lock for each Python: writing replaces this Python's lines and keeps the
others'. Local version labels are dropped (`torch==2.13.0+cpu` is pinned as
`torch==2.13.0`), so the lock also resolves where that build is not on disk.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

LOCK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "constraints.txt")
HEADER = """\
# The versions the test suite passed with, one set per Python (the lock). Used by the
# README's install commands and by .ci/run as pip constraints: pip installs these
# versions for whatever setup.py asks for and adds nothing. Written by .ci/lock.py
# (`bash .ci/run --newest --write-lock` tests the newest allowed releases and locks them).
"""
_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^;\s]+)\s*(?:;\s*(.*))?$")


def marker() -> str:
  return f'python_version == "{sys.version_info.major}.{sys.version_info.minor}"'


def installed() -> dict[str, str]:
  """name -> version of this environment's packages (pip included, this project not)."""
  out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                       check=True, capture_output=True, text=True).stdout
  pins = {}
  for line in out.splitlines():
    match = _PIN.match(line.strip())
    if match and match.group(1).lower() not in ("moe-embed", "moe_embed"):
      pins[match.group(1)] = match.group(2).split("+")[0]
  return pins


def read_lock() -> list[tuple[str, str, str]]:
  """(name, version, marker) of every pin in the lock."""
  if not os.path.exists(LOCK):
    return []
  pins = []
  for number, line in enumerate(open(LOCK, encoding="utf-8"), 1):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    match = _PIN.match(line)
    if not match:
      raise SystemExit(f"{LOCK}:{number}: not a 'name==version ; marker' pin: {line!r}")
    pins.append((match.group(1), match.group(2), match.group(3) or ""))
  return pins


def diff() -> None:
  ours = {name.lower(): version for name, version, m in read_lock() if m == marker()}
  now = {name.lower(): version for name, version in installed().items()}
  rows = [(name, ours.get(name, "-"), now.get(name, "-"))
          for name in sorted(set(ours) | set(now)) if ours.get(name) != now.get(name)]
  print(f"Against the lock ({marker()}): {len(rows)} packages differ.")
  for name, locked, current in rows:
    print(f"  {name}: {locked} -> {current}")


def write() -> None:
  keep = [(n, v, m) for n, v, m in read_lock() if m != marker()]
  pins = keep + [(n, v, marker()) for n, v in installed().items()]
  pins.sort(key=lambda p: (p[2], p[0].lower()))
  with open(LOCK + ".tmp", "w", encoding="utf-8") as f:
    f.write(HEADER)
    for name, version, where in pins:
      f.write(f"{name}=={version} ; {where}\n")
  os.replace(LOCK + ".tmp", LOCK)
  print(f"Wrote {sum(1 for p in pins if p[2] == marker())} pins for {marker()} to {LOCK}.")


if __name__ == "__main__":
  args = sys.argv[1:]
  if args not in ([], ["--diff"]):
    raise SystemExit(f"usage: python {sys.argv[0]} [--diff]")
  diff() if args else write()

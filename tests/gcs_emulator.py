"""The GCS emulator the tests start: `gcp-storage-emulator`, with two GCS download behaviours added.

GCS answers an object download with `x-goog-generation` and
`x-goog-metageneration` headers, and TensorStore (so Orbax) reads an object's
generation from them; and it serves suffix ranges (`Range: bytes=-N`, the last N
bytes), with which ArrayRecord's reader starts. The emulator does neither, so
both are added here, before its server builds its route table; nothing else is
changed.

  python -m tests.gcs_emulator start --host=127.0.0.1 --port=PORT --in-memory
"""

import re
import sys

from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.storage import NotFound

_download = objects.download


def _download_as_gcs(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except NotFound:
    obj = None
  suffix = re.fullmatch(r"\s*bytes=-(\d+)\s*", request.get_header("range", "") or "")
  if obj is not None and suffix:  # The last N bytes: an explicit range from the start byte.
    start = max(0, int(obj["size"]) - int(suffix.group(1)))
    request._request_handler.headers.replace_header("Range", f"bytes={start}-")  # pylint: disable=protected-access
  _download(request, response, storage, *args, **kwargs)
  if obj is not None:
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])


objects.download = _download_as_gcs

from gcp_storage_emulator.__main__ import main  # noqa: E402  (after the patch above)

if __name__ == "__main__":
  sys.exit(main())

"""The GCS emulator the tests start: `gcp-storage-emulator` with the generation headers of GCS.

GCS answers an object download with `x-goog-generation` and
`x-goog-metageneration` headers, and TensorStore (so Orbax) reads an object's
generation from them; the emulator leaves them out. They are added here, before
the emulator's server builds its route table; nothing else is changed.

  python -m tests.gcs_emulator start --host=127.0.0.1 --port=PORT --in-memory
"""

import sys

from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.storage import NotFound

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except NotFound:
    return
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj["metageneration"])


objects.download = _download_with_generation

from gcp_storage_emulator.__main__ import main  # noqa: E402  (after the patch above)

if __name__ == "__main__":
  sys.exit(main())

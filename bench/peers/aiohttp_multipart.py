"""aiohttp peer for multipart/form-data: stream the file part to disk with the
MultipartReader, as aiohttp's docs show for file uploads (read_chunk in 64 KiB, like
aiohttp_upload.py's iter_chunked)."""

import os
import sys

from aiohttp import BodyPartReader, web

STORE = sys.argv[2]


async def upload(request: web.Request) -> web.Response:
    reader = await request.multipart()
    n = 0
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader) or part.filename is None:
            continue
        with open(os.path.join(STORE, "upload.bin"), "wb") as f:
            while chunk := await part.read_chunk(1 << 16):
                f.write(chunk)
                n += len(chunk)
    return web.json_response({"size": n}, status=201)


app = web.Application(client_max_size=0)
app.router.add_post("/jobs", upload)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)

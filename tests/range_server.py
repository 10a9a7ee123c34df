"""A static HTTP server with range requests, run as its own process by tests (``python tests/range_server.py
DIR``; prints the port, logs each Range header to DIR/ranges.log).

Python's ``http.server`` has no range requests and GDAL's /vsicurl/ reads by ranges. It must be another process:
rasterio holds the GIL while GDAL waits on the network, so a server thread in the test process would deadlock.
"""

from __future__ import annotations

import functools
import http.server
import io
import os
import sys
from pathlib import Path


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP range requests (Python's handler has none; GDAL's /vsicurl/ reads by ranges)."""

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def send_head(self):
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return None
        data = Path(path).read_bytes()
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            with open(os.path.join(self.directory, "ranges.log"), "a") as log:
                log.write(rng + "\n")
            first, _, last = rng[6:].split(",")[0].partition("-")
            start = int(first) if first else len(data) - int(last)
            end = min(int(last) if first and last else len(data) - 1, len(data) - 1)
            body = data[start : end + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return io.BytesIO(body)


if __name__ == "__main__":
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=sys.argv[1]))
    print(server.server_address[1], flush=True)
    server.serve_forever()

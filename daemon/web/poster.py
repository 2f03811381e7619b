"""``python -m daemon.web.poster < video.mp4 > poster.jpg``: the first frame as a small JPEG.

Run as a child of the web process (:func:`daemon.web.files.poster`), which caches the result in
the state folder, never in the outbox.
"""

from __future__ import annotations

import io
import sys

import av
from PIL import Image

MAX_SIDE = 480


def main() -> int:
    with av.open(sys.stdin.buffer, "r") as container:
        if not container.streams.video:
            print("no video stream", file=sys.stderr)
            return 1
        for frame in container.decode(video=0):
            image: Image.Image = frame.to_image()  # type: ignore[no-untyped-call]
            break
        else:
            print("no frame", file=sys.stderr)
            return 1
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=80)
    sys.stdout.buffer.write(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())

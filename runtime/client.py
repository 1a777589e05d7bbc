"""A small client of ``edgediff serve`` (standard library only):

    from edgediff.runtime.client import Client
    client = Client("http://127.0.0.1:8000")
    png = client.generate(label=3, seed=0)                    # PNG bytes
    arrays = client.generate(label=3, n=4, format="npz")      # {"images": (4, H, W, C) uint8, "labels": ...}
"""
from __future__ import annotations

import io
import json
import urllib.error
import urllib.request

from .errors import EdgediffError


class ServerError(EdgediffError):
    """The server refused the request (``status``: its HTTP status) or could not be reached."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 300.0):
        self.url, self.timeout = url.rstrip("/"), timeout
        self.last_batch: int | None = None      # samples in the last answer's denoiser batch

    def _open(self, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except (ValueError, AttributeError):
                message = exc.reason
            raise ServerError(f"{exc.code}: {message}", exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ServerError(f"cannot reach {self.url}: {getattr(exc, 'reason', exc)}") from None

    def health(self) -> bool:
        with self._open("/health") as r:
            return json.load(r).get("status") == "ok"

    def info(self) -> dict:
        with self._open("/info") as r:
            return json.load(r)

    def generate(self, label: int | None = None, prompt: str | None = None, seed: int = 0, n: int = 1,
                 first: int = 0, steps: int | None = None, guidance: float | None = None, sampler: str | None = None,
                 format: str = "png"):
        """PNG bytes (``format="png"``; a grid when n > 1) or a dict of arrays (``"npz"``)."""
        body = {"class": label, "prompt": prompt, "seed": seed, "n": n, "first": first, "steps": steps,
                "guidance": guidance, "sampler": sampler, "format": format}
        with self._open("/generate", {k: v for k, v in body.items() if v is not None}) as r:
            self.last_batch = int(r.headers.get("X-Edgediff-Batch", 0)) or None
            data = r.read()
        if format != "npz":
            return data
        import numpy as np

        with np.load(io.BytesIO(data)) as z:
            return {k: z[k] for k in z.files}

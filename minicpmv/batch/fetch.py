"""http(s) media in batch rows: fetched with the server's fetcher (size limits, timeouts), private hosts allowed:
the rows are the job owner's own."""

from __future__ import annotations

from minicpmv.serve.media import MediaPolicy, fetch_media

POLICY = MediaPolicy(allow_private=True, allowed_schemes=frozenset({"http", "https"}))


def fetch_url(url: str, kind: str = "image") -> bytes:
    return fetch_media(url, POLICY, kind)

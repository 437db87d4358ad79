"""Where health canaries reply: shared by the canary tasks (writers) and ``progress-reset health`` (reader).

- with Redis (``settings.redis_url``, which defaults to the Redis broker) the reply is a key
  ``progress_reset:health:<nonce>:<queue>`` that expires after five minutes;
- on the embedded filesystem broker (no Redis) it is a small file
  ``<data_dir>/health/<nonce>.<queue>.json``: the embedded workers share the machine and the
  data directory with the command, so the same proof works.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from models.settings import Settings

REPLY_KEY_PREFIX = "progress_reset:health"
REPLY_TTL_SECONDS = 300
NONCE = re.compile(r"^[0-9a-f]{8,64}$")


class _RedisReplies:
    def __init__(self, url: str):
        import redis

        self.client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)

    @staticmethod
    def _key(nonce: str, queue: str) -> str:
        return f"{REPLY_KEY_PREFIX}:{nonce}:{queue}"

    def put(self, nonce: str, queue: str, reply: dict) -> None:
        self.client.set(self._key(nonce, queue), json.dumps(reply), ex=REPLY_TTL_SECONDS)

    def get_many(self, nonce: str, queues: list[str]) -> dict[str, dict]:
        values = self.client.mget([self._key(nonce, q) for q in queues]) if queues else []
        return {q: json.loads(v) for q, v in zip(queues, values) if v is not None}

    def discard(self, nonce: str, queues: list[str]) -> None:
        if queues:
            self.client.delete(*[self._key(nonce, q) for q in queues])

    def close(self) -> None:
        self.client.close()

    describe = "redis"


class _FileReplies:
    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, nonce: str, queue: str) -> Path:
        return self.folder / f"{nonce}.{queue}.json"

    def put(self, nonce: str, queue: str, reply: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self._path(nonce, queue)
        partial = final.with_suffix(".tmp")
        partial.write_text(json.dumps(reply))
        os.replace(partial, final)  # readers never see half a reply

    def get_many(self, nonce: str, queues: list[str]) -> dict[str, dict]:
        found = {}
        for queue in queues:
            try:
                found[queue] = json.loads(self._path(nonce, queue).read_text())
            except (FileNotFoundError, ValueError):
                continue
        return found

    def discard(self, nonce: str, queues: list[str]) -> None:
        for queue in queues:
            self._path(nonce, queue).unlink(missing_ok=True)
        # Replies that arrived after their check gave up: keep the folder small.
        cutoff = time.time() - REPLY_TTL_SECONDS
        for stale in self.folder.glob("*.json"):
            try:
                if stale.stat().st_mtime < cutoff:
                    stale.unlink()
            except FileNotFoundError:
                continue

    def close(self) -> None:
        pass

    describe = "file"


def reply_store(settings: Settings):
    """Redis when one is configured (production), else files under the data directory (embedded)."""
    if settings.redis_url:
        return _RedisReplies(settings.redis_url)
    return _FileReplies(settings.data_dir / "health")

"""``infinitetalkd web``: a page and a versioned JSON API beside the watch folder.

Stack: FastAPI on uvicorn. FastAPI because its request and response models are pydantic models,
the same library the config schema is moving to, so a setting is described once; it serves an
OpenAPI description of ``/api/v1`` without extra code; and it (with Starlette and uvicorn
underneath) is widely used and maintained. The page is server-rendered with Jinja2 (autoescaping
every value) plus one small plain script: no build step, no CDN, works offline.

The process needs no GPU and no engine. It only
- reads the job store through :class:`daemon.store.Store` and ``state/inbox.json`` (the scanner's
  waiting stems),
- serves result files from the outbox (and a failed job's log from its failed/ folder) without
  following symlinks or listing folders,
- writes submissions into the inbox under ignored temporary names, renamed into place and
  committed with ``<stem>.ready``, so the daemon's ingest is the only way a job is created,
- changes a job only through the store transitions the CLI uses (cancel, retry: :mod:`daemon.ops`).

Modules: :mod:`.server` (start-up checks, uvicorn), :mod:`.app` (routes), :mod:`.security`
(token, session cookie, CSRF), :mod:`.files` (safe file serving, posters, failure logs),
:mod:`.submit` (uploads into the inbox), :mod:`.state` (store access and the page's snapshot).
"""

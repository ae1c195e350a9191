"""The trainer's artifact helpers (`read_artifact`, `list_artifacts`,
`archive_artifacts`) for ControllerToolBackend: its keyword arguments, its
returned dict keys and its texts. Paths are relative to the workspace;
failures are `success: False` dicts, never exceptions."""
from __future__ import annotations

import base64
import hashlib
import io
import mimetypes
import posixpath
import tarfile
from typing import TYPE_CHECKING, Any, Optional

from .conventions import Refused
from .errors import SlotError

if TYPE_CHECKING:
    from .client import AsyncClient
    from .results import Slot

READ_MAX = 5_000_000
LIST_MAX = 5_000
ARCHIVE_MAX = 5_000_000
ARCHIVE_ENTRIES_MAX = 100_000
DENIED = "Access denied: path outside workspace"


def _rel(path: str) -> str:
    p = posixpath.normpath(path or ".")
    while p.startswith("./"):
        p = p[2:]
    return "." if p in ("", ".") else p


def _error_text(code: str, message: str, path: str, file_expected: bool) -> str:
    if code == "path_escape":
        return DENIED
    if code == "not_found":
        return f"Not found: {path}"
    if file_expected and code == "bad_request" and "director" in message:
        return f"Not a file: {path}"
    if not file_expected and code == "bad_request" and "not a directory" in message:
        return f"Not a directory: {path}"
    return f"{code}: {message}" if message else code


class ArtifactsMixin:
    """Needs `_get_client()` and `_relative(path, ws)` (which raises
    Refused for an absolute path outside the workspace) from the class it
    is mixed into."""

    async def _get_client(self) -> "AsyncClient":  # pragma: no cover - provided by the backend
        raise NotImplementedError

    def _relative(self, path: str, ws: str) -> str:  # pragma: no cover
        raise NotImplementedError

    def _artifact_path(self, slot: "Slot | str", path: str) -> str | None:
        ws = getattr(slot, "workspace_dir", "") or ""
        try:
            return _rel(self._relative(str(path), ws))
        except Refused:  # an absolute path outside the workspace
            return None

    async def read_artifact(self, slot: "Slot | str", path: str, *, encoding: str = "text",
                            max_bytes: Optional[int] = None, include_sha256: bool = False,
                            timeout_s: Optional[float] = None) -> dict[str, Any]:
        """{success, content, error, encoding, truncated, bytes, file_size,
        path, mime, sha256}: at most 5,000,000 bytes of the file, as UTF-8
        text (invalid bytes replaced) or base64."""
        rel = self._artifact_path(slot, path)
        base: dict[str, Any] = {"success": False, "content": "", "error": "",
                                "encoding": encoding, "truncated": False, "bytes": 0,
                                "file_size": None, "path": rel if rel is not None else path,
                                "mime": None, "sha256": None}
        if encoding not in ("text", "base64"):
            return {**base, "error": f"Unsupported encoding: {encoding} (text or base64)"}
        if rel is None:
            return {**base, "error": DENIED}
        limit = READ_MAX if max_bytes is None else max(0, min(int(max_bytes), READ_MAX))
        try:
            client = await self._get_client()
            res = await client.read_artifact(_handle(slot), rel, max_bytes=limit,
                                             timeout=timeout_s)
        except SlotError as e:
            return {**base, "error": _error_text(e.code, e.message, rel, True)}
        data = bytes(res.get("content") or b"")
        size = int(res.get("size", len(data)))
        content = base64.b64encode(data).decode("ascii") if encoding == "base64" \
            else data.decode("utf-8", errors="replace")
        return {**base, "success": True, "content": content, "truncated": size > len(data),
                "bytes": len(data), "file_size": size,
                "mime": mimetypes.guess_type(rel)[0],
                "sha256": hashlib.sha256(data).hexdigest() if include_sha256 else None}

    async def list_artifacts(self, slot: "Slot | str", path: str = ".", *,
                             recursive: bool = False, max_entries: Optional[int] = None,
                             timeout_s: Optional[float] = None) -> dict[str, Any]:
        """{success, entries: [{path, is_dir, size, mtime}], truncated,
        error}: paths relative to the workspace, sorted within each
        directory, symlinked directories not followed, at most 5,000."""
        limit = LIST_MAX if max_entries is None else max(0, min(int(max_entries), LIST_MAX))
        rel = self._artifact_path(slot, path)
        if rel is None:
            return {"success": False, "entries": [], "truncated": False, "error": DENIED}
        try:
            client = await self._get_client()
            res = await client.list_artifacts(_handle(slot), rel, recursive=recursive,
                                              max_entries=limit + 1, timeout=timeout_s)
        except SlotError as e:
            return {"success": False, "entries": [], "truncated": False,
                    "error": _error_text(e.code, e.message, rel, False)}
        raw = [e for e in (res.get("entries") or []) if isinstance(e, dict)]
        # Pre-order: each directory's entries sorted by name, a directory's
        # contents right after it.
        children: dict[str, list[dict[str, Any]]] = {}
        for e in raw:
            p = str(e.get("path", ""))
            children.setdefault(posixpath.dirname(p), []).append(e)
        ordered: list[dict[str, Any]] = []

        def walk(d: str) -> None:
            for e in sorted(children.get(d, []), key=lambda x: posixpath.basename(str(x["path"]))):
                ordered.append(e)
                if e.get("type") == "dir":
                    walk(str(e["path"]))

        walk("")
        truncated = bool(res.get("truncated")) or len(ordered) > limit
        entries = [{"path": _rel(posixpath.join(rel, str(e["path"]))),
                    "is_dir": e.get("type") == "dir", "size": int(e.get("size") or 0),
                    "mtime": float(e.get("mtime") or 0) / 1000.0} for e in ordered[:limit]]
        return {"success": True, "entries": entries, "truncated": truncated, "error": ""}

    async def archive_artifacts(self, slot: "Slot | str", path: str = ".", *,
                                archive_format: str = "tar.gz", max_bytes: Optional[int] = None,
                                max_entries: Optional[int] = None,
                                timeout_s: Optional[float] = None) -> dict[str, Any]:
        """{success, content (base64 of a tar.gz), error, encoding, format,
        bytes, entry_count}: the regular files under `path`, named relative
        to the workspace."""
        fmt = "tar.gz" if archive_format in ("tar.gz", "tgz") else None
        base: dict[str, Any] = {"success": False, "content": "", "error": "",
                                "encoding": "base64", "format": "tar.gz", "bytes": 0,
                                "entry_count": 0}
        if fmt is None:
            return {**base, "error": f"Unsupported archive format: {archive_format} "
                                     f"(tar.gz or tgz)"}
        limit = ARCHIVE_MAX if max_bytes is None else max(0, int(max_bytes))
        rel = self._artifact_path(slot, path)
        if rel is None:
            return {**base, "error": DENIED}
        try:
            client = await self._get_client()
            res = await client.archive_artifacts(_handle(slot), rel, format="tar",
                                                 timeout=timeout_s)
        except SlotError as e:
            return {**base, "error": _error_text(e.code, e.message, rel, False)}
        # The agent's archive holds directories and symlinks too: a tree's
        # members as "./REL" under `path`, a single file under its base name
        # (beside it). Keep the regular files, named from the workspace.
        src = tarfile.open(fileobj=io.BytesIO(bytes(res.get("data") or b"")), mode="r:")
        out = io.BytesIO()
        count = 0
        cap = ARCHIVE_ENTRIES_MAX if max_entries is None else max(0, int(max_entries))
        with tarfile.open(fileobj=out, mode="w:gz") as dst:
            for m in src:
                if not m.isreg():
                    continue
                count += 1
                if count > cap:
                    return {**base, "error": f"Archive too large: more than {cap} entries "
                                             f"(max {cap})"}
                parent = rel if m.name.startswith("./") else posixpath.dirname(rel)
                full = _rel(posixpath.join(parent, m.name))
                f = src.extractfile(m)
                m.name = full
                dst.addfile(m, f)
        data = out.getvalue()
        if len(data) > limit:
            return {**base, "error": f"Archive too large: {len(data)} bytes (max {limit})"}
        return {**base, "success": True, "content": base64.b64encode(data).decode("ascii"),
                "bytes": len(data), "entry_count": count}


def _handle(slot: Any) -> str:
    return str(getattr(slot, "slot_id", slot))

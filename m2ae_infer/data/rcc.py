"""Package plumbing for :mod:`m2ae_infer.data.corpus`: WebP images cut out of Qt resource (``.rcc``) files,
licenses read from Debian copyright files (DEP-5) and GCompris README stanzas, and ``.deb`` unpacking.

A Qt resource file (``qres`` magic, format versions 1-3) is a tree of nodes, a names table (UTF-16) and a data
area where each payload is a big-endian uint32 length followed by the bytes (zlib, with a 4-byte size prefix,
when the node's flag 1 is set). WebP payloads are stored as is; each is a ``RIFF <le uint32 n> WEBP`` block of
``n + 8`` bytes. :func:`webp_blocks` finds the blocks by scanning, so that a damaged or unknown tree still
yields the images; :func:`rcc_paths` names them from the tree when it parses.
"""
from __future__ import annotations

import fnmatch
import io
import re
import struct
import tarfile
import zlib
from pathlib import Path

__all__ = ["webp_blocks", "rcc_paths", "rcc_text_files", "rcc_webps", "dep5_license", "readme_license",
           "unpack_deb"]


def webp_blocks(data: bytes) -> list[tuple[int, bytes]]:
    """Every complete ``RIFF....WEBP`` block in ``data``, as (offset, bytes), in file order."""
    out, pos = [], 0
    while (pos := data.find(b"RIFF", pos)) >= 0:
        if data[pos + 8:pos + 12] == b"WEBP" and pos + 8 <= len(data):
            size = struct.unpack_from("<I", data, pos + 4)[0] + 8
            if size >= 20 and pos + size <= len(data):
                out.append((pos, data[pos:pos + size]))
                pos += size
                continue
        pos += 4
    return out


def _tree(data: bytes) -> dict[str, tuple[int, int]]:
    """Resource path -> (offset of the payload's length field, flags); {} if ``data`` is not a Qt rcc file."""
    if data[:4] != b"qres" or len(data) < 20:
        return {}
    version, tree_off, data_off, names_off = struct.unpack_from(">4I", data, 4)
    node_size = 22 if version >= 2 else 14
    out: dict[str, tuple[int, int]] = {}

    def name(offset: int) -> str:
        offset += names_off
        n = struct.unpack_from(">H", data, offset)[0]
        return data[offset + 6:offset + 6 + 2 * n].decode("utf-16-be")

    def walk(index: int, prefix: str, depth: int) -> None:
        if depth > 64:
            raise ValueError("rcc tree too deep")
        at = tree_off + index * node_size
        name_off, flags = struct.unpack_from(">IH", data, at)
        here = "" if index == 0 else name(name_off)
        if flags & 2:   # a directory: child count, first child index
            count, first = struct.unpack_from(">II", data, at + 6)
            for child in range(first, first + count):
                walk(child, f"{prefix}{here}/" if index else "/", depth + 1)
        else:           # a file: country, language, data offset
            out[prefix + here] = (data_off + struct.unpack_from(">I", data, at + 10)[0], flags)

    try:
        walk(0, "", 0)
    except (struct.error, UnicodeDecodeError, ValueError, RecursionError):
        return {}
    return out


def rcc_paths(data: bytes) -> dict[int, str]:
    """Offset of each stored payload's first byte -> its resource path (``/gcompris/src/...``)."""
    return {at + 4: path for path, (at, _flags) in _tree(data).items()}


def rcc_text_files(data: bytes, basename: str = "README") -> dict[str, str]:
    """Resource path -> text of every resource named ``basename`` (decompressed where flag 1 is set)."""
    out = {}
    for path, (at, flags) in _tree(data).items():
        if path.rsplit("/", 1)[-1] != basename:
            continue
        n = struct.unpack_from(">I", data, at)[0]
        raw = data[at + 4:at + 4 + n]
        try:
            out[path] = (zlib.decompress(raw[4:]) if flags & 1 else raw).decode("utf-8", "replace")
        except zlib.error:
            continue
    return out


def rcc_webps(data: bytes, fallback: str = "webp") -> list[tuple[str, bytes]]:
    """(resource path, WebP bytes) of every WebP in ``data``; a block the tree does not name is called
    ``<fallback>@<offset>``."""
    names = rcc_paths(data)
    return [(names.get(offset, f"{fallback}@{offset}"), block) for offset, block in webp_blocks(data)]


_IMAGE_EXT = re.compile(r"\.(jpe?g|png|webp|svgz?|gif|bmp|tiff?)$", re.I)


def _stanzas(text: str) -> list[dict[str, str]]:
    """DEP-5 (or README) paragraphs as field -> value (continuation lines joined by newlines)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in para.splitlines():
            m = re.match(r"^([A-Za-z][\w-]*):\s*(.*)$", line)
            if m:
                key = m.group(1).lower()
                fields[key] = m.group(2).strip()
            elif key and line.strip():
                fields[key] += "\n" + line.strip()
        if fields:
            out.append(fields)
    return out


def dep5_license(copyright_text: str, path: str) -> str:
    """The ``License`` of the last DEP-5 ``Files`` stanza matching ``path`` (as the format says: the last match
    wins). A pattern also matches a path's tail (installed paths are deeper than source paths) and ignores an
    image extension (GCompris converted its .jpg/.png sources to .webp); a pattern with a folder and a plain
    file name matches by that name (lomiri lists ``16.04/x.jpg`` for ``usr/share/backgrounds/x.jpg``).
    ``"unknown"`` if nothing matches."""
    stem = _IMAGE_EXT.sub("", path.lstrip("/"))
    found = "unknown"
    for fields in _stanzas(copyright_text):
        if "files" not in fields or "license" not in fields:
            continue
        for pattern in fields["files"].split():
            pat = _IMAGE_EXT.sub("", pattern)
            base = pat.rsplit("/", 1)[-1]
            if (fnmatch.fnmatchcase(stem, pat) or fnmatch.fnmatchcase(stem, "*/" + pat)
                    or ("/" in pat and not re.search(r"[*?\[]", base) and stem.rsplit("/", 1)[-1] == base)):
                found = fields["license"].splitlines()[0].strip()
                break
    return found


def readme_license(readme_text: str, relpath: str) -> str | None:
    """The ``License`` of the README stanza whose ``Files`` lists ``relpath`` (relative to the README's folder),
    or None."""
    for fields in _stanzas(readme_text):
        if "license" in fields and relpath in fields.get("files", "").split():
            return fields["license"].splitlines()[0].strip()
    return None


def unpack_deb(deb: Path, dest: Path) -> None:
    """Unpack a Debian package's ``data.tar.*`` into ``dest`` (the files land under ``dest/usr/...``), in
    Python: a .deb is an ``ar`` archive. zstd members (not readable by tarfile) go through ``dpkg-deb -x``."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ValueError(f"{deb} is not a Debian package (no ar header)")
        while header := f.read(60):
            if len(header) < 60:
                break
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            if name.startswith("data.tar"):
                if name.endswith(".zst"):
                    import subprocess
                    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
                    return
                _extract_files(io.BytesIO(f.read(size)), dest)
                return
            f.seek(size + (size & 1), 1)
    raise ValueError(f"{deb} holds no data.tar member")


def _extract_files(fileobj, dest: Path) -> None:
    """Regular files only (links and devices are not needed here), never outside ``dest``."""
    root = Path(dest).resolve()
    with tarfile.open(fileobj=fileobj) as tar:
        for member in tar:
            if not member.isfile():
                continue
            target = (root / member.name.lstrip("/")).resolve()
            if root not in target.parents:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)

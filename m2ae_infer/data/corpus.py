"""A real-photo corpus assembled from registry packages (``m2ae-data fetch DIR``), and its reading API.

Layout: ``DIR/photos/<source>/<name>.png`` (8-bit RGB), ``DIR/objects/<source>/<name>.png`` (RGBA cut-outs),
``DIR/videos/<source>/<file>`` (copied as is), ``DIR/manifest.json`` and ``DIR/manifest.csv``. Photos are split
by a fixed rule: sorted by ``file``, every 8th (index % 8 == 3) is "dev", the rest "train"; everything from the
sources reserved for evaluation (``--heldout``) is "heldout". See docs/corpus.md.

API: :func:`read_manifest`, :func:`photos`, :func:`load_rgb`, :func:`load_rgba`; errors are :class:`CorpusError`.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from ..atomic import TEMP_PREFIX, atomic_write
from ..cliutil import OneLineArgumentParser, cli_main, path_arg, progress_stream, say
from ..errors import M2AEError
from ..messages import one_line
from . import sources as S
from .rcc import dep5_license, unpack_deb

__all__ = ["CorpusError", "Entry", "read_manifest", "photos", "load_rgb", "load_rgba", "fetch", "main"]

FORMAT, VERSION = "m2ae-corpus", 1
KINDS, SPLITS = ("photo", "cutout", "video"), ("train", "dev", "heldout")
DEV_EVERY, DEV_INDEX = 8, 3


class CorpusError(M2AEError, ValueError):
    """A corpus folder that cannot be used; the message is one line naming the file and what to do."""


@dataclass(frozen=True)
class Entry:
    file: str
    kind: str
    split: str
    source: str
    version: str
    license: str
    original: str
    width: int
    height: int
    original_width: int
    original_height: int
    bytes: int
    sha256: str
    path: Path = Path()

    def record(self) -> dict:
        d = asdict(self)
        del d["path"]
        return d


COLUMNS = tuple(f.name for f in fields(Entry) if f.name != "path")


def read_manifest(root: str | os.PathLike[str]) -> list[Entry]:
    """The entries of ``root/manifest.json``, each with ``path`` the absolute file path (checked to exist)."""
    root = Path(root).absolute()
    manifest = root / "manifest.json"
    if not manifest.is_file():
        raise CorpusError(f"{manifest}: no corpus manifest; run m2ae-data fetch {root}")
    try:
        doc = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorpusError(f"{manifest}: unreadable ({one_line(exc)}); rebuild it with m2ae-data fetch {root} "
                          "--force") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION \
            or not isinstance(doc.get("entries"), list):
        raise CorpusError(f"{manifest}: not a {FORMAT} version {VERSION} manifest; rebuild it with m2ae-data "
                          f"fetch {root} --force")
    out = []
    for i, rec in enumerate(doc["entries"]):
        try:
            entry = Entry(**{k: rec[k] for k in COLUMNS}, path=root / rec["file"])
        except (KeyError, TypeError):
            raise CorpusError(f"{manifest}: entry {i} lacks fields ({', '.join(COLUMNS)} expected); rebuild it "
                              f"with m2ae-data fetch {root} --force") from None
        if entry.kind not in KINDS or entry.split not in SPLITS or Path(entry.file).is_absolute() \
                or ".." in Path(entry.file).parts:
            raise CorpusError(f"{manifest}: entry {i} ({entry.file}) has a bad kind, split or file name")
        if not entry.path.is_file():
            raise CorpusError(f"{entry.path}: listed in {manifest} but missing; rebuild with m2ae-data fetch "
                              f"{root} --force")
        out.append(entry)
    return out


def photos(root: str | os.PathLike[str], split: str | tuple[str, ...] = ("train",), kind: str = "photo", *,
           allow_heldout: bool = False) -> list[Path]:
    """Absolute paths of the ``kind`` entries in ``split`` (one name or a tuple), sorted by file. "heldout" is
    refused unless ``allow_heldout``; so is a manifest that puts held-out material in train or dev."""
    splits = (split,) if isinstance(split, str) else tuple(split)
    bad = [s for s in splits if s not in SPLITS]
    if bad or kind not in KINDS:
        raise CorpusError(f"split {bad[0] if bad else split!r} / kind {kind!r}: expected splits {SPLITS} and "
                          f"kinds {KINDS}")
    if "heldout" in splits and not allow_heldout:
        raise CorpusError(f"{root}: the heldout split is reserved for independent evaluation; pass "
                          "allow_heldout=True only in an evaluation")
    entries = read_manifest(root)
    leaked = [e.file for e in entries if e.split != "heldout" and S.is_reserved(e.source, e.original)]
    if leaked or ({"heldout", "train"} <= {e.split for e in entries}):
        raise CorpusError(f"{Path(root) / 'manifest.json'}: held-out material mixed with training material "
                          f"({leaked[0] if leaked else 'train and heldout entries in one manifest'}); keep "
                          "the held-out corpus in its own folder (m2ae-data fetch DIR --heldout)")
    return [e.path for e in sorted(entries, key=lambda e: e.file) if e.kind == kind and e.split in splits]


def _load(path, mode: str) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode), dtype=np.float32) / 255.0
    except (OSError, ValueError) as exc:
        raise CorpusError(f"{path}: cannot read the image ({one_line(exc)}); rebuild the corpus with "
                          "m2ae-data fetch DIR --force") from None


def load_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """float32 [H, W, 3] in [0, 1]."""
    return _load(path, "RGB")


def load_rgba(path: str | os.PathLike[str]) -> np.ndarray:
    """float32 [H, W, 4] in [0, 1] (alpha last)."""
    return _load(path, "RGBA")


# --- building -----------------------------------------------------------------------------------------------------

def acquire(src: S.Source, cache: Path | None, work: Path) -> tuple[Path, str]:
    """The package file (from ``cache`` if there, else downloaded into ``cache`` or ``work``) and its version."""
    stem = src.package.replace("-", "_") if src.registry == "pypi" else src.package
    pattern = f"{stem}-{src.pin or '*'}-*.whl" if src.registry == "pypi" else f"{stem}_*.deb"
    for folder in [cache] if cache else []:
        hits = sorted(folder.glob(pattern))
        if hits:
            return hits[-1], _version(hits[-1], src)
    dest = cache or work
    if src.registry == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(dest),
               f"{src.package}=={src.pin}" if src.pin else src.package]
    else:
        cmd = ["apt-get", "download", src.package]
    run = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
    hits = sorted(dest.glob(pattern))
    if run.returncode or not hits:
        tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no file came"]
        what = " ".join(cmd[-2:] if src.registry == "debian" else cmd[-1:])
        raise CorpusError(f"{src.name}: download failed ({what}: {one_line(tail[0], 200)}); put the file in a "
                          "--cache folder and run again")
    return hits[-1], _version(hits[-1], src)


def _version(path: Path, src: S.Source) -> str:
    part = path.name.split("-" if src.registry == "pypi" else "_")[1]
    return urllib.parse.unquote(part)


def unpack(package: Path, dest: Path) -> None:
    if package.suffix == ".whl":
        with zipfile.ZipFile(package) as z:
            z.extractall(dest)
    else:
        unpack_deb(package, dest)


def _write(found: S.Found, out: Path, max_side: int) -> tuple[int, int, int, int]:
    """Write one item; (width, height, original width, original height)."""
    from PIL import Image
    data = found.data.read_bytes() if isinstance(found.data, Path) else found.data
    out.parent.mkdir(parents=True, exist_ok=True)
    if found.kind == "video":
        out.write_bytes(data)
        return 0, 0, 0, 0
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        w, h = im.size
        if im.mode in ("I;16", "I;16B", "I"):   # 16-bit gray: keep the top 8 bits
            im = Image.fromarray((np.asarray(im, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
        if found.kind == "cutout":
            im = im.convert("RGBA")
        else:
            im = im.convert("RGBA").convert("RGB") if "A" in im.mode or im.mode == "P" else im.convert("RGB")
        scale = max(found.scale, max(w, h) / max_side)
        if scale > 1:
            im = im.resize((max(1, round(w / scale)), max(1, round(h / scale))), Image.LANCZOS)
        im.save(out, format="PNG", optimize=False)
        return im.size[0], im.size[1], w, h


def assign_splits(records: list[dict], heldout: bool) -> None:
    """The fixed split rule (in place): see the module docstring."""
    if heldout:
        for r in records:
            r["split"] = "heldout"
        return
    for i, r in enumerate(sorted((r for r in records if r["kind"] == "photo"), key=lambda r: r["file"])):
        r["split"] = "dev" if i % DEV_EVERY == DEV_INDEX else "train"
    for r in records:
        if r["kind"] != "photo":
            r["split"] = "dev" if r["original"].endswith("/vtest.avi") else "train"


def write_manifest(root: Path, records: list[dict]) -> None:
    records = sorted(records, key=lambda r: r["file"])
    with atomic_write(root / "manifest.csv", "w", overwrite=True, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(records)
    with atomic_write(root / "manifest.json", "w", overwrite=True) as f:   # last: its presence means complete
        json.dump({"format": FORMAT, "version": VERSION, "entries": records}, f, indent=1)
        f.write("\n")


def extract_into(stage: Path, src: S.Source, root: Path, version: str, max_side: int, records: list[dict],
                 bar=None) -> int:
    """Run ``src``'s extractor on the unpacked package ``root`` and write its items under ``stage``."""
    copyright_file = root / "usr/share/doc" / src.package / "copyright"
    copyright_text = copyright_file.read_text(encoding="utf-8", errors="replace") if copyright_file.is_file() else ""
    wheel = S.wheel_license(root) if src.registry == "pypi" else None
    seen, names, count = set(), set(), 0
    for found in src.extract(root):
        data = found.data.read_bytes() if isinstance(found.data, Path) else found.data
        digest = S.sha256(data)
        if digest in seen:   # the same file under two names
            continue
        seen.add(digest)
        found.data = data
        name, n = found.name, 1
        while name in names:
            n, name = n + 1, f"{found.name}-{n + 1}"
        names.add(name)
        folder = {"photo": "photos", "cutout": "objects", "video": "videos"}[found.kind]
        suffix = Path(found.original).suffix if found.kind == "video" else ".png"
        rel = f"{folder}/{src.name}/{name}{suffix}"
        w, h, ow, oh = _write(found, stage / rel, max_side)
        if found.license:
            lic = found.license
        elif wheel:
            lic = wheel
        elif src.name == "gcompris-qt-data":
            lic = S.gcompris_license(copyright_text, found.original)
        else:
            lic = dep5_license(copyright_text, found.original)
        written = (stage / rel).read_bytes()
        records.append(dict(file=rel, kind=found.kind, split="train", source=src.name, version=version, license=lic,
                            original=found.original, width=w, height=h, original_width=ow, original_height=oh,
                            bytes=len(written), sha256=S.sha256(written)))
        count += 1
        if bar is not None:
            bar.update(1)
    return count


def fetch(out: str | os.PathLike[str], *, cache=None, max_side: int = 1024, names=None, force: bool = False,
          heldout: bool = False, log=say) -> list[dict]:
    """Build the corpus in ``out`` (see the module docstring); returns the manifest records."""
    from tqdm import tqdm
    out = Path(out).absolute()
    table = S.HELDOUT_SOURCES if heldout else S.SOURCES
    chosen = list(table) if not names else names
    unknown = [n for n in chosen if n not in table]
    if unknown:
        raise CorpusError(f"--sources {unknown[0]}: unknown; choose from {', '.join(table)}")
    if max_side < 16:
        raise CorpusError(f"--max-side {max_side}: too small; give 16 or more (default 1024)")
    if out.exists() and not out.is_dir():
        raise CorpusError(f"{out}: a file is in the way; give a folder name")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "manifest.json").is_file():
            raise CorpusError(f"{out}: a non-empty folder that is not a corpus; give a new or empty folder")
        if not force:
            raise CorpusError(f"{out}: already holds a corpus; pass --force to rebuild it")
    cache = Path(cache).absolute() if cache else None
    if cache and not cache.is_dir():
        raise CorpusError(f"--cache {cache}: no such folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{out.name}-", dir=out.parent))
    records: list[dict] = []
    try:
        work = stage / ".work"
        work.mkdir()
        bar = tqdm(desc="m2ae-data: extracting", unit="file", file=progress_stream(), leave=False)
        for name in chosen:
            src = table[name]
            package, version = acquire(src, cache, work)
            root = work / src.name
            unpack(package, root)
            bar.set_postfix_str(src.name)
            n = extract_into(stage, src, root, version, max_side, records, bar)
            shutil.rmtree(root)
            log(f"m2ae-data: {src.name} {version}: {n} file(s)")
        bar.close()
        shutil.rmtree(work)
        assign_splits(records, heldout)
        write_manifest(stage, records)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{out.name}-old-", dir=out.parent))
            os.rename(out, old / "corpus")
            os.rename(stage, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return records


def summary(entries) -> list[str]:
    rows, groups = [], {}
    for e in entries:
        e = e if isinstance(e, dict) else e.record()
        groups.setdefault((e["source"], e["version"]), []).append(e)
    rows.append(f"{'source':28} {'version':24} {'count':>5}  kinds / splits / licenses")
    for (source, version), es in sorted(groups.items()):
        def tally(key):
            keys = sorted({x[key] for x in es})
            return ", ".join(f"{k} {sum(x[key] == k for x in es)}" for k in keys)
        rows.append(f"{source:28} {version:24} {len(es):5}  {tally('kind')} / {tally('split')} / {tally('license')}")
    rows.append(f"{'total':28} {'':24} {len(entries):5}  "
                + ", ".join(f"{s} {sum((e['split'] if isinstance(e, dict) else e.split) == s for e in entries)}"
                            for s in SPLITS))
    return rows


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog="m2ae-data", description="Assemble the real-photo corpus from registry "
                              "packages (docs/corpus.md).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineArgumentParser)
    f = sub.add_parser("fetch", help="download the sources and write DIR/photos, objects, videos and manifest")
    f.add_argument("dir", metavar="DIR", type=path_arg)
    f.add_argument("--cache", metavar="CACHE", help="a folder holding already-downloaded .deb/.whl files "
                   "(reused; what it lacks is downloaded into it)")
    f.add_argument("--max-side", type=int, default=1024, help="longest side of the written photos (default 1024)")
    f.add_argument("--sources", help="comma-separated source names (default: all)")
    f.add_argument("--heldout", action="store_true", help="fetch the sources reserved for independent evaluation")
    f.add_argument("--force", action="store_true", help="replace an existing corpus in DIR")
    ls = sub.add_parser("list", help="print the corpus table")
    ls.add_argument("dir", metavar="DIR", type=path_arg)
    return p


@cli_main("m2ae-data", usage=(CorpusError,))
def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:   # --help (0) or a one-line usage error (2), returned as the exit code
        return int(exc.code or 0)
    if args.command == "list":
        for row in summary(read_manifest(args.dir)):
            say(row)
        return 0
    names = [n.strip() for n in args.sources.split(",") if n.strip()] if args.sources else None
    records = fetch(args.dir, cache=args.cache, max_side=args.max_side, names=names, force=args.force,
                    heldout=args.heldout)
    for row in summary(records):
        say(row)
    say(f"m2ae-data: wrote {len(records)} file(s) and {Path(args.dir) / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

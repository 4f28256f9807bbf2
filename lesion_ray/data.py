"""ISIC 2018 data sets in any storage: discovery, image/mask pairing, train/validation splits.

One listing of the URI (paginated on S3) finds the ISIC 2018 challenge's layout:
``ISIC2018_Task1-2_<Subset>_Input/ISIC_<id>.jpg``, Task 1 masks
``ISIC2018_Task1_<Subset>_GroundTruth/ISIC_<id>_segmentation.png`` and Task 2 masks
``ISIC2018_Task2_<Subset>_GroundTruth[_v3]/ISIC_<id>_attribute_<name>.png``. A plain folder of
images (prediction input) is accepted too. Images and masks are paired by their 7-digit id;
whatever cannot be paired becomes a :class:`Problem` and is left out of training, never a crash.

Discovery reads names only, no pixels: a mask whose size differs from its image is found while
the pair is decoded (``preprocess.image_dataset`` turns it into a per-row error), because reading
every header here would cost one request per object on S3 before any work starts.
"""

from __future__ import annotations

import csv
import io
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field

from lesion_ray import report, storage

ATTRIBUTES = ("pigment_network", "negative_network", "streaks", "milia_like_cyst", "globules")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Images in formats lesion-ray does not decode: error rows (convert them), not objects to skip.
UNSUPPORTED_IMAGE_SUFFIXES = (".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".webp", ".gif", ".heic", ".heif",
                              ".jp2", ".j2k", ".jxl", ".ppm", ".pgm", ".raw", ".nef", ".cr2", ".dng")
DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # 25x the largest ISIC 2018 image file
SPLITS = ("train", "validation")

_ISIC_ID = re.compile(r"ISIC_\d{7}")
_SEGMENTATION = re.compile(r"^(?P<stem>.+)_segmentation\.png$", re.IGNORECASE)
_ATTRIBUTE = re.compile(r"^(?P<stem>.+)_attribute_(?P<name>[a-z_]+)\.png$", re.IGNORECASE)
_EXAMPLES = 3


@dataclass(frozen=True)
class Sample:
    id: str  # "ISIC_0000123"
    image: str  # URI of the image
    segmentation: str | None = None  # Task 1 mask URI
    attributes: dict[str, str] | None = None  # Task 2: attribute name -> mask URI (all five)


@dataclass
class Problem:
    id: str
    path: str
    reason: str  # "<kind>" or "<kind>: <detail>"; summaries group by kind


@dataclass
class Discovery:
    samples: list[Sample]
    problems: list[Problem] = field(default_factory=list)

    def summary(self) -> str:
        """Counts, and a few examples of every kind of problem."""
        lines = [f"{len(self.samples)} usable samples, {len(self.problems)} problems"]
        groups: dict[str, list[Problem]] = defaultdict(list)
        for p in self.problems:
            groups[p.reason.split(":")[0]].append(p)
        for kind, items in sorted(groups.items()):
            examples = ", ".join(storage.basename(p.path) for p in items[:_EXAMPLES])
            more = ", ..." if len(items) > _EXAMPLES else ""
            lines.append(f"  {len(items)} x {kind} (e.g. {examples}{more})")
        return "\n".join(lines)


def sample_id(uri: str) -> str:
    """The ISIC id in a file name (``ISIC_0000123``), else the name without its extension."""
    name = storage.basename(uri)
    found = _ISIC_ID.search(name)
    return found.group(0) if found else name.rsplit(".", 1)[0]


FOLDERS = {
    "input": "ISIC2018_Task1-2_{subset}_Input",
    "task1": "ISIC2018_Task1_{subset}_GroundTruth",
    "task2": "ISIC2018_Task2_{subset}_GroundTruth",  # Training's is ..._GroundTruth_v3
}


def _folder_re(kind: str, subset: str) -> re.Pattern[str]:
    version = r"(_v\d+)?" if kind == "task2" else ""
    return re.compile(rf"(^|/){FOLDERS[kind].format(subset=subset)}{version}/", re.IGNORECASE)


def _subsets(files: list[str], kind: str) -> list[str]:
    """The subsets (Training, Validation, ...) that have a ``kind`` folder among ``files``."""
    pattern = _folder_re(kind, "(?P<subset>[A-Za-z]+)")
    return sorted({m.group("subset") for f in files if (m := pattern.search(f))})


def _in_folder(files: list[str], kind: str, subset: str) -> list[str]:
    pattern = _folder_re(kind, subset)
    return [f for f in files if pattern.search(f)]


def _layout_root(uri: str) -> tuple[str, str | None]:
    """(root to list, subset) when ``uri`` is itself an ISIC input folder, else (uri, None)."""
    found = re.fullmatch(r"ISIC2018_Task1-2_(\w+?)_Input", storage.basename(uri), re.IGNORECASE)
    return (storage.parent(uri), found.group(1)) if found else (uri, None)


def input_folder(uri: str, subset: str) -> str:
    """The folder whose images predict reads: ``uri`` itself (an ISIC input folder, or any folder of images),
    or, when ``uri`` is an ISIC root, its ``subset``'s input folder. Lists one level, never the archive."""
    if _layout_root(uri)[1] is not None:
        return storage.normalize(uri)
    pattern = re.compile(FOLDERS["input"].format(subset=r"(?P<subset>[A-Za-z]+)"), re.IGNORECASE)
    inputs = {m.group("subset"): name for name in storage.list_folders(uri) if (m := pattern.fullmatch(name))}
    for found, name in inputs.items():
        if found.lower() == subset.lower():
            return storage.join(uri, name)
    if inputs:
        raise ValueError(f"no {subset} images under {uri}; it holds the subsets {', '.join(sorted(inputs))}")
    return storage.normalize(uri)


def triage(info: storage.FileInfo, max_bytes: int) -> tuple[str, str] | None:
    """What becomes of a listed object, from its listing alone (name, size, the listing's problem with it): None
    for an image to predict on, ``("error", reason)`` for an image that cannot be (an unsupported type, too large,
    a name no manifest can hold), ``("skipped", reason)`` for anything else (a mask, a licence, a CSV, a folder
    that could not be read)."""
    name = storage.basename(info.uri).lower()
    if _is_mask(info.uri):
        return "skipped", "a mask, not an input image"
    if name.endswith(IMAGE_SUFFIXES):
        if info.problem:
            return "error", info.problem
        if info.size > max_bytes:
            return "error", f"the object is {info.size:,} bytes, over max_bytes ({max_bytes:,}): not read"
        return None
    if name.endswith(UNSUPPORTED_IMAGE_SUFFIXES):
        suffix = "." + name.rsplit(".", 1)[-1]
        return "error", f"unsupported image type {suffix}: convert it to JPEG or PNG"
    return "skipped", info.problem or "not an image file"


def discover(uri: str, subset: str = "Training", task: int | None = None) -> Discovery:
    """Find the images (and masks) of ``subset`` under ``uri``.

    ``uri`` may be an ISIC root, an ISIC input folder (its ground truth is looked for beside it),
    or a plain folder of images. ``task`` 1 or 2 keeps only images with all their masks; ``None``
    attaches whatever masks exist and keeps every image.
    """
    root, named_subset = _layout_root(uri)
    subset = named_subset or subset
    listed = storage.list_files(root, with_problems=True)
    files = [f.uri for f in listed if not f.problem]
    unusable = [Problem(sample_id(f.uri), f.uri, f"unreadable: {f.problem}") for f in listed if f.problem]
    if named_subset is not None:
        inputs = [f for f in files if f.startswith(storage.normalize(uri) + "/")]
    else:
        inputs = _in_folder(files, "input", subset)
        if not inputs:
            if others := _subsets(files, "input"):
                raise ValueError(f"no {subset} images under {uri}; it holds the subsets {', '.join(others)}")
            found = _plain_folder(uri, files, task)
            found.problems[:0] = unusable
            return found
    images, problems = _images(inputs)
    segmentations, attributes = _ground_truth(files, subset, task, root, problems)
    return _pair(images, segmentations, attributes, task, unusable + problems)


def _plain_folder(uri: str, files: list[str], task: int | None) -> Discovery:
    if task is not None:
        raise ValueError(
            f"{uri} is not an ISIC 2018 layout: training needs ISIC2018_Task1-2_<Subset>_Input/ and "
            f"ISIC2018_Task{task}_<Subset>_GroundTruth/ folders (generate one with `kind: synth`)"
        )
    images = [f for f in files if not _is_mask(f)]
    found, problems = _images(images)
    if not found:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {uri}")
    return Discovery([Sample(key, found[key]) for key in sorted(found)], problems)


def _is_mask(uri: str) -> bool:
    name = storage.basename(uri)
    return bool(_SEGMENTATION.match(name) or _ATTRIBUTE.match(name))


def _images(files: list[str]) -> tuple[dict[str, str], list[Problem]]:
    images: dict[str, str] = {}
    problems: list[Problem] = []
    for f in files:
        if not f.lower().endswith(IMAGE_SUFFIXES):
            problems.append(Problem(sample_id(f), f, "not an image file (ignored)"))
        elif (key := sample_id(f)) in images:
            problems.append(Problem(key, f, f"duplicate id: also {images[key]}"))
        else:
            images[key] = f
    return images, problems


def _ground_truth(
    files: list[str], subset: str, task: int | None, root: str, problems: list[Problem]
) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    task1 = _in_folder(files, "task1", subset)
    task2 = _in_folder(files, "task2", subset)
    for wanted, found in ((1, task1), (2, task2)):
        if task == wanted and not found:
            raise ValueError(
                f"no Task {wanted} ground truth for subset {subset!r} under {root}: expected a folder "
                f"{FOLDERS[f'task{wanted}'].format(subset=subset)}/ holding the masks"
            )
    return _segmentations(task1, problems), _attributes(task2, problems)


def _segmentations(files: list[str], problems: list[Problem]) -> dict[str, str]:
    out: dict[str, str] = {}
    for f in files:
        if _SEGMENTATION.match(storage.basename(f)):
            out[sample_id(f)] = f
        else:
            problems.append(Problem(sample_id(f), f, "not a Task 1 mask name (ignored)"))
    return out


def _attributes(files: list[str], problems: list[Problem]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for f in files:
        found = _ATTRIBUTE.match(storage.basename(f))
        if found and found.group("name").lower() in ATTRIBUTES:
            out[sample_id(f)][found.group("name").lower()] = f
        else:
            problems.append(Problem(sample_id(f), f, "not a Task 2 mask name (ignored)"))
    return dict(out)


def _pair(
    images: dict[str, str],
    segmentations: dict[str, str],
    attributes: dict[str, dict[str, str]],
    task: int | None,
    problems: list[Problem],
) -> Discovery:
    for key in sorted(segmentations.keys() - images.keys()):
        problems.append(Problem(key, segmentations[key], "mask without image"))
    for key in sorted(attributes.keys() - images.keys()):
        problems.append(Problem(key, next(iter(attributes[key].values())), "mask without image"))
    samples = []
    for key in sorted(images):
        found = attributes.get(key, {})
        complete = len(found) == len(ATTRIBUTES)
        if task == 1 and key not in segmentations:
            problems.append(Problem(key, images[key], "image without Task 1 mask"))
            continue
        if task == 2 and not complete:
            missing = ", ".join(a for a in ATTRIBUTES if a not in found)
            problems.append(Problem(key, images[key], f"image without all Task 2 masks: missing {missing}"))
            continue
        attrs = {a: found[a] for a in ATTRIBUTES} if complete else None
        samples.append(Sample(key, images[key], segmentations.get(key), attrs))
    if not samples:
        raise ValueError(f"no usable images found:\n{Discovery(samples, problems).summary()}")
    return Discovery(samples, problems)


def discover_ground_truth(uri: str, subset: str = "Validation", task: int = 1) -> dict[str, dict[str, str]]:
    """id -> ``{"segmentation": uri}`` (task 1) or ``{attribute: uri, ...}`` (task 2).

    ``uri`` may be an ISIC root (the ``subset``'s ground-truth folder is used) or a folder of masks.
    """
    files = [f.uri for f in storage.list_files(uri)]
    kind = f"task{task}"
    is_folder = _folder_re(kind, "[A-Za-z]+").search(storage.basename(uri) + "/")
    masks = [] if is_folder else _in_folder(files, kind, subset)
    if not masks and not is_folder and (others := _subsets(files, kind)):
        raise ValueError(f"no {subset} Task {task} masks under {uri}; it holds the subsets {', '.join(others)}")
    if not masks:  # the ground-truth folder itself, or any folder of masks
        pattern = _SEGMENTATION if task == 1 else _ATTRIBUTE
        masks = [f for f in files if pattern.match(storage.basename(f))]
    problems: list[Problem] = []
    if task == 1:
        out = {key: {"segmentation": f} for key, f in _segmentations(masks, problems).items()}
    else:
        out = _attributes(masks, problems)
    if not out:
        raise ValueError(
            f"no Task {task} masks found under {uri}: expected ISIC_<id>_"
            f"{'segmentation' if task == 1 else 'attribute_<name>'}.png files (check task and subset)"
        )
    if problems:
        report.info(f"ground truth under {uri}: ignored {len(problems)} files, e.g. {problems[0].path}")
    return out


def split_samples(
    samples: list[Sample], val_fraction: float = 0.2, seed: int = 0, split_csv: str | None = None,
    advice: str = "add a row id,split for each, or drop split_csv to split by seed",
) -> dict[str, list[Sample]]:
    """``{"train": [...], "validation": [...]}``: seeded and independent of input order, or from a CSV.

    Each list is sorted by id. With ``val_fraction`` > 0 and two or more samples, neither is empty.

    The CSV has a header ``id,split`` and splits ``train`` or ``validation``; every sample must be in it, else the
    error ends with ``advice``.
    """
    ordered = sorted(samples, key=lambda s: s.id)
    if split_csv:
        assignment = _read_split(split_csv)
        missing = [s.id for s in ordered if s.id not in assignment]
        if missing:
            raise ValueError(
                f"{len(missing)} samples are not in {split_csv} (e.g. {', '.join(missing[:_EXAMPLES])}): {advice}"
            )
        return {name: [s for s in ordered if assignment[s.id] == name] for name in SPLITS}
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    shuffled = list(ordered)
    random.Random(seed).shuffle(shuffled)
    n_val = round(len(shuffled) * val_fraction)
    if val_fraction > 0 and len(shuffled) > 1:  # both sides non-empty, however small the set
        n_val = min(max(n_val, 1), len(shuffled) - 1)
    validation = {s.id for s in shuffled[:n_val]}
    return {
        "train": [s for s in ordered if s.id not in validation],
        "validation": [s for s in ordered if s.id in validation],
    }


def _read_split(uri: str) -> dict[str, str]:
    rows = list(csv.reader(io.StringIO(storage.read_text(uri))))
    if not rows or [c.strip().lower() for c in rows[0]] != ["id", "split"]:
        raise ValueError(f"{uri}: the first line must be the header id,split")
    out = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2 or row[1].strip() not in SPLITS:
            raise ValueError(f"{uri} line {line}: expected <id>,train or <id>,validation, got {','.join(row)!r}")
        out[row[0].strip()] = row[1].strip()
    return out


def write_split(splits: dict[str, list[Sample]], uri: str) -> None:
    """Write the split as CSV ``id,split`` (sorted by id), readable by :func:`split_samples`."""
    rows = sorted((s.id, name) for name, items in splits.items() for s in items)
    storage.write_text(uri, "id,split\n" + "".join(f"{key},{name}\n" for key, name in rows))

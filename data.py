"""Datasets, the seen/unseen protocol, class embeddings (the table behind M) and `shapes`: all that
lies between files on disk (or nothing at all) and `(image, label)` tensors. Reading order:

1. Class lists as data.
2. `train_transform`, `eval_transform`, `_Segmentation`: classes in model order (seen, then unseen,
   each in raw-id order), a `lut` from raw label values to model indices, `choose_images`.
3. `VOC` (2012 + SBD), `Context33` (from the common 59-class PNGs), `COCOStuff` (164k).
4. Class embeddings (paper section 4.2): word2vec `.bin` and fastText `.vec` readers, then the tables.
5. `Shapes`, the built-in benchmark (PROTOCOL section 7): `_shapes_scenes`, then `_render_shapes`.
6. `build_dataset`, `label_colours`, `save_preview` and the CLI `main` (`--preview`, `--all`).

Symbols: y (label map) -> `label`; e = M(y) -> a row of the class embedding table; seen / unseen
classes -> model indices `range(num_seen)` / `range(num_seen, num_seen + num_unseen)`. Items are
`(image (3, H, W) float32, label (H, W) int64)`. Errors, never a silent skip: `DatasetError` (files;
`EmbeddingError`: word vectors), `ValueError` (arguments). Choices: README "Datasets", "Deviations".
"""
import argparse
import gzip
import hashlib
import json
import os
import re
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.utils import make_grid
from tqdm import tqdm

IGNORE = 255
PADDING = 254  # label of a training crop's padding: ignored like 255, but self-training knows it lies outside the image
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DatasetError(Exception):
    """A dataset file or folder is missing, unreadable or holds invalid values."""


class EmbeddingError(DatasetError):
    """Word vectors miss words, have the wrong dimension or are malformed."""


def _check(ok, message: str, error: type[Exception] = DatasetError) -> None:
    """Raise `error(message)` unless `ok`; the message is built either way, so hot loops use `if`."""
    if not ok:
        raise error(message)


# ------------------------------------------------------------------ 1. classes
VOC_CLASSES = ("aeroplane,bicycle,bird,boat,bottle,bus,car,cat,chair,cow,dining table,dog,horse,"
               "motorbike,person,potted plant,sheep,sofa,train,tv monitor").split(",")  # raw 1-20
VOC_UNSEEN = ["potted plant", "sheep", "sofa", "train", "tv monitor"]
CONTEXT33_CLASSES = VOC_CLASSES + ("sky,grass,ground,road,building,tree,water,mountain,wall,floor,"
                                   "track,keyboard,ceiling").split(",")  # raw 1-33
CONTEXT33_UNSEEN = ["cow", "motorbike", "sofa", "cat"]
CONTEXT59_CLASSES = (  # values 1-59 of the common 59-class Pascal Context PNGs; 0 is unlabelled
    "aeroplane,bag,bed,bedclothes,bench,bicycle,bird,boat,book,bottle,building,bus,cabinet,car,cat,"
    "ceiling,chair,cloth,computer,cow,cup,curtain,dog,door,fence,floor,flower,food,grass,ground,horse,"
    "keyboard,light,motorbike,mountain,mouse,person,plate,platform,pottedplant,road,rock,sheep,shelves,"
    "sidewalk,sign,sky,snow,sofa,table,track,train,tree,truck,tvmonitor,wall,water,window,wood").split(",")
# The 59-class files write VOC's two-word names as one token and call the dining table "table".
_RENAME_59 = {"table": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}
CONTEXT59_TO_33 = {v: CONTEXT33_CLASSES.index(_RENAME_59.get(n, n)) + 1 for v, n in enumerate(CONTEXT59_CLASSES, 1)
                   if _RENAME_59.get(n, n) in CONTEXT33_CLASSES}  # every other value -> unlabelled
COCO_STUFF_CLASSES = (  # PNG values 0-181
    "person,bicycle,car,motorcycle,airplane,bus,train,truck,boat,traffic light,fire hydrant,street sign,stop sign,"
    "parking meter,bench,bird,cat,dog,horse,sheep,cow,elephant,bear,zebra,giraffe,hat,backpack,umbrella,shoe,"
    "eye glasses,handbag,tie,suitcase,frisbee,skis,snowboard,sports ball,kite,baseball bat,baseball glove,skateboard,"
    "surfboard,tennis racket,bottle,plate,wine glass,cup,fork,knife,spoon,bowl,banana,apple,sandwich,orange,broccoli,"
    "carrot,hot dog,pizza,donut,cake,chair,couch,potted plant,bed,mirror,dining table,window,desk,toilet,door,tv,"
    "laptop,mouse,remote,keyboard,cell phone,microwave,oven,toaster,sink,refrigerator,blender,book,clock,vase,"
    "scissors,teddy bear,hair drier,toothbrush,hair brush,banner,blanket,branch,bridge,building-other,bush,cabinet,"
    "cage,cardboard,carpet,ceiling-other,ceiling-tile,cloth,clothes,clouds,counter,cupboard,curtain,desk-stuff,dirt,"
    "door-stuff,fence,floor-marble,floor-other,floor-stone,floor-tile,floor-wood,flower,fog,food-other,fruit,"
    "furniture-other,grass,gravel,ground-other,hill,house,leaves,light,mat,metal,mirror-stuff,moss,mountain,mud,"
    "napkin,net,paper,pavement,pillow,plant-other,plastic,platform,playingfield,railing,railroad,river,road,rock,"
    "roof,rug,salad,sand,sea,shelf,sky-other,skyscraper,snow,solid-other,stairs,stone,straw,structural-other,table,"
    "tent,textile-other,towel,tree,vegetable,wall-brick,wall-concrete,wall-other,wall-panel,wall-stone,wall-tile,"
    "wall-wood,water-other,waterdrops,window-blind,window-other,wood").split(",")
COCO_STUFF_ABSENT = [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]  # ids that never occur -> 255
COCO_STUFF_UNSEEN = ["frisbee", "skateboard", "cardboard", "carrot", "scissors", "suitcase", "giraffe",
                     "cow", "road", "wall-concrete", "tree", "grass", "river", "clouds", "playingfield"]


# ------------------------------------------------------------------ 2. transforms
class RandomScale(v2.Transform):
    """Resize image and label by one factor s ~ U(scale); labels are resized nearest."""

    def __init__(self, scale: tuple[float, float] = (0.5, 1.5)):
        super().__init__()
        self.scale = scale

    def make_params(self, flat_inputs):
        (h, w), s = v2.query_size(flat_inputs), float(torch.empty(()).uniform_(*self.scale))
        return {"size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt, params):
        return F.resize(inpt, params["size"], antialias=True)  # tv_tensors.Mask always uses nearest


def train_transform(crop_size: int, *, scale: tuple[float, float] = (0.5, 1.5), mean=IMAGENET_MEAN,
                    std=IMAGENET_STD) -> v2.Compose:
    """The lineage's augmentation; crops smaller than `crop_size` are padded with image 0 and label `PADDING`."""
    fill = {tv_tensors.Image: 0, tv_tensors.Mask: PADDING}
    return v2.Compose([RandomScale(scale), v2.RandomCrop(crop_size, pad_if_needed=True, fill=fill),
                       v2.RandomHorizontalFlip(), eval_transform(mean=mean, std=std)])


def eval_transform(size: int | None = None, *, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    """The whole image at its own size; with `size`, image and label warped to size x size."""
    return v2.Compose(([v2.Resize((size, size), antialias=True)] if size else [])
                      + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])  # labels stay integer


class _Segmentation(torch.utils.data.Dataset):
    """What every dataset shares. A subclass names its classes `raw_names` ({raw id: name}), its
    `unseen` ones, `num_values` (label values 0..num_values - 1 and 255 are valid) and its `splits`
    ({split: its name on disk}; every split but the training one is a test split)."""
    ignore_index = IGNORE
    mean, std = IMAGENET_MEAN, IMAGENET_STD  # the backbone's pretraining; pass these to the transforms
    value_to_raw = None  # {label value: raw id} where the two differ (Context)
    splits = {"train": "train", "test": "test"}

    def __init__(self, split: str, transform):
        _check(split in self.splits, f"unknown split {split!r}; expected one of {sorted(self.splits)}", ValueError)
        self.split, self.transform = "train" if self.splits[split] == self.splits["train"] else "test", transform
        self.raw_ids = sorted(self.raw_names, key=lambda r: (self.raw_names[r] in self.unseen, r))  # model order
        self.class_names = [self.raw_names[r] for r in self.raw_ids]
        self.num_seen, self.num_unseen = len(self.raw_ids) - len(self.unseen), len(self.unseen)
        self.lut = np.full(256, -1, dtype=np.int64)  # (256,) label value -> model index; -1: invalid
        self.lut[:self.num_values] = self.lut[IGNORE] = IGNORE
        self.unseen_values = np.zeros(256, dtype=bool)  # (256,) label value -> an unseen class's?
        for value, raw in (self.value_to_raw or {r: r for r in self.raw_names}).items():
            index = self.raw_ids.index(raw)  # unseen classes are ignored in training
            self.unseen_values[value] = index >= self.num_seen
            self.lut[value] = IGNORE if self.split == "train" and index >= self.num_seen else index

    def choose_images(self, unseen_images: str, quiet: bool = False) -> dict[str, int]:
        """--unseen-images: ``ignore`` keeps every training image, its unseen pixels ignored (the lineage);
        ``drop`` keeps only images without an unseen pixel (paper section 3.1). Returns what each keeps."""
        _check(self.split == "train", f"--unseen-images: {self.split} is not a training split", ValueError)
        holds = self.holds_unseen(quiet)  # (N,) bool
        self.keep({"ignore": np.ones_like(holds), "drop": ~holds}[unseen_images])
        return {"ignore": len(holds), "drop": int((~holds).sum())}

    def _finish(self, image: torch.Tensor, label: torch.Tensor):
        """uint8 image (3, H, W) and label (H, W) -> transformed plain tensors."""
        transform = self.transform or eval_transform(mean=self.mean, std=self.std)
        image, label = transform(tv_tensors.Image(image), tv_tensors.Mask(label.long()))
        return image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor).long()


# ------------------------------------------------------------------ 3. real datasets
def _read_list(path: Path) -> list[str]:
    _check(path.is_file(), f"missing list file {path}")
    # A line is an id or, as in DeepLab's train_aug.txt, "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png".
    return [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]


class _LabelledFiles(_Segmentation):
    """JPEG images with PNG labels of raw values, under the first of `tops` (in --data-root) that
    holds every folder in `needs` ({}: the split's name on disk); `_pairs` lists (image, label)."""

    def __init__(self, root, split: str, transform=None):
        super().__init__(split, transform)
        self.name, disk = type(self).__name__, self.splits[split]
        tried = [Path(root) / t for t in self.tops]
        top = next((t for t in tried if all((t / n.format(disk)).is_dir() for n in self.needs)), None)
        _check(top is not None, f"{self.name}: no dataset found under {root} (looked in {', '.join(map(str, tried))})"
               f".\nExpected layout under --data-root: {self.layout}; see README section 'Datasets'.")
        self.pairs, source = self._pairs(top, disk)
        _check(self.pairs, f"{self.name}: {source} lists no images")
        # One directory listing per folder, so 118k files are checked in a second.
        listing = {f: set(os.listdir(f)) if f.is_dir() else set() for f in {p.parent for ps in self.pairs for p in ps}}
        missing = [str(p) for pair in self.pairs for p in pair if p.name not in listing[p.parent]]
        _check(not missing, f"{self.name}: {len(missing)} file(s) named by {source} do not exist, e.g.\n  "
               + "\n  ".join(missing[:10]))

    def __len__(self) -> int:
        return len(self.pairs)

    def holds_unseen(self, quiet: bool = False) -> np.ndarray:
        """(N,) bool: which images hold an unseen class's pixel; reads every label."""
        return np.array([self.unseen_values[np.asarray(self._read(label)).clip(0, 255)].any() for _, label in
                         tqdm(self.pairs, f"{self.name}: unseen pixels", dynamic_ncols=True, disable=quiet)])

    def keep(self, which: np.ndarray) -> None:
        self.pairs = [pair for pair, kept in zip(self.pairs, which) if kept]

    def _read(self, path: Path) -> Image.Image:
        try:
            (image := Image.open(path)).load()  # decode now, so a corrupt file fails here, naming itself
            return image
        except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for a corrupt file
            raise DatasetError(f"{self.name}: cannot read {path}: {e}") from e

    def __getitem__(self, i: int):
        image_path, label_path = self.pairs[i]
        image = F.pil_to_tensor(self._read(image_path).convert("RGB"))  # (3, H, W) uint8
        label_image = self._read(label_path)
        _check(label_image.mode in ("L", "P", "I", "I;16"), f"{self.name}: label {label_path} has mode "
               f"{label_image.mode}, expected a single-channel (L or P) PNG of class ids")
        raw = np.asarray(label_image).astype(np.int64)  # (H, W); a "P" image gives its palette indices
        _check(tuple(image.shape[1:]) == raw.shape, f"{self.name}: image {image_path} is "
               f"{tuple(image.shape[1:])} (H, W) but label {label_path} is {raw.shape}")
        label = self.lut[raw.clip(0, 255)]  # (H, W)
        bad = (raw > 255) | (label < 0)
        _check(not bad.any(), f"{self.name}: label {label_path} holds invalid values {np.unique(raw[bad]).tolist()} "
               f"(valid: 0-{self.num_values - 1} and 255)")
        return self._finish(image, torch.from_numpy(label))


class VOC(_LabelledFiles):
    """Pascal VOC 2012 + SBD: train = `train_aug` (10,582), test = `val` (1,449); background -> 255."""
    raw_names, unseen, num_values = dict(enumerate(VOC_CLASSES, 1)), VOC_UNSEEN, 21
    splits = {"train": "train_aug", "train_aug": "train_aug", "test": "val", "val": "val"}
    tops, needs = ["", "VOCdevkit/VOC2012", "VOC2012"], ["JPEGImages", "ImageSets/Segmentation"]
    layout = "VOCdevkit/VOC2012/{JPEGImages, SegmentationClassAug, SegmentationClass, ImageSets/Segmentation}"

    def _pairs(self, top: Path, lst: str) -> tuple[list[tuple[Path, Path]], str]:
        official = {p.name for p in (top / "SegmentationClass").glob("*.png")}  # used where present
        return [(top / "JPEGImages" / f"{i}.jpg",
                 top / ("SegmentationClass" if f"{i}.png" in official else "SegmentationClassAug") / f"{i}.png")
                for i in _read_list(top / "ImageSets/Segmentation" / f"{lst}.txt")], f"{lst}.txt"


class Context33(_LabelledFiles):
    """Pascal Context, 33 classes: train 4,998, test = `val` 5,105; read from the 59-class PNGs."""
    raw_names, unseen, num_values = dict(enumerate(CONTEXT33_CLASSES, 1)), CONTEXT33_UNSEEN, 60
    value_to_raw, splits = CONTEXT59_TO_33, {"train": "train", "test": "val"}
    tops, needs = ["", "VOCdevkit/VOC2010", "VOC2010"], ["JPEGImages", "SegmentationClassContext"]
    layout = "VOCdevkit/VOC2010/{JPEGImages, SegmentationClassContext, ImageSets/SegmentationContext}"

    def _pairs(self, top: Path, lst: str) -> tuple[list[tuple[Path, Path]], str]:
        return [(top / "JPEGImages" / f"{i}.jpg", top / "SegmentationClassContext" / f"{i}.png")
                for i in _read_list(top / "ImageSets/SegmentationContext" / f"{lst}.txt")], f"{lst}.txt"


class COCOStuff(_LabelledFiles):
    """COCO-Stuff 164k, 171 classes: train = train2017 (118,287), test = val2017 (5,000)."""
    raw_names = {r: n for r, n in enumerate(COCO_STUFF_CLASSES) if r not in COCO_STUFF_ABSENT}
    unseen, num_values, splits = COCO_STUFF_UNSEEN, 182, {"train": "train2017", "test": "val2017"}
    tops, needs = ["", "coco_stuff164k"], ["images/{}", "annotations/{}"]
    layout = "coco_stuff164k/{images, annotations (the stuffthingmaps PNGs)}/{train2017, val2017}"

    def _pairs(self, top: Path, sub: str) -> tuple[list[tuple[Path, Path]], str]:
        images = sorted((top / "images" / sub).glob("*.jpg"))
        return [(p, top / "annotations" / sub / f"{p.stem}.png") for p in images], f"images/{sub}"


# ------------------------------------------------------------------ 4. class embeddings (M)
def name_words(name: str) -> list[str]:
    return [w for w in re.split(r"[\s_\-]+", name) if w]


def _variants(word: str) -> list[str]:
    return list(dict.fromkeys([word, word.lower(), word.capitalize(), word.upper()]))


def _open(path):
    _check(Path(path).is_file(), f"word-vector file {path} does not exist", EmbeddingError)
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def read_word2vec_binary(path, words=None) -> dict[str, np.ndarray]:
    """word2vec binary: a header "N D", then N times: word, space, D little-endian float32."""
    wanted, vectors, buf, pos = (None if words is None else set(words)), {}, b"", 0
    with _open(path) as f:
        header = f.readline().split()
        _check(len(header) == 2 and all(h.isdigit() for h in header),
               f"{path}: not a word2vec binary file (header {header!r})", EmbeddingError)
        n, d = map(int, header)
        for i in range(n):
            while (space := buf.find(b" ", pos)) < 0 or len(buf) < space + 1 + 4 * d:  # the file is 3.6 GB:
                if not (chunk := f.read(1 << 20)):  # read it 1 MiB at a time
                    raise EmbeddingError(f"{path}: truncated after {i} of {n} words")
                buf, pos = buf[pos:] + chunk, 0
            word = buf[pos:space].lstrip(b"\n").decode("utf-8", "replace")  # some writers end vectors with \n
            if wanted is None or word in wanted:
                vectors[word] = np.frombuffer(buf, "<f4", d, space + 1).copy()
            pos = space + 1 + 4 * d
    return vectors


def read_fasttext_vec(path, words=None) -> dict[str, np.ndarray]:
    """fastText .vec text: an optional header "N D", then lines "word v_1 ... v_D"."""
    wanted, vectors, d = (None if words is None else {w.encode() for w in words}), {}, None
    with _open(path) as f:
        for lineno, line in enumerate(f, 1):
            word, _, rest = line.rstrip(b"\r\n").partition(b" ")
            if lineno == 1 and word.isdigit() and rest.strip().isdigit():
                d = int(rest)
            elif wanted is None or word in wanted:
                try:
                    vector = np.array(rest.split(), dtype=np.float32)
                except ValueError as e:
                    raise EmbeddingError(f"{path}:{lineno}: malformed vector for {word!r}") from e
                d = d or len(vector)
                if len(vector) != d:
                    raise EmbeddingError(f"{path}:{lineno}: {word!r} has {len(vector)} values, expected {d}")
                vectors[word.decode("utf-8", "replace")] = vector
    return vectors


def class_embedding_table(class_names: list[str], sources: list, *, source_names=None) -> torch.Tensor:
    """(C, D_1 + D_2 + ...): e_c = normalise(mean_w v_1(w) (+) mean_w v_2(w) (+) ...), w over the
    words of class c's name; `sources` are word -> vector mappings."""
    source_names = source_names or [f"source {s}" for s in range(len(sources))]
    # found[c][s]: {word of class c: its vector in source s (the first spelling found), or None}
    found = [[{w: next((src[v] for v in _variants(w) if v in src), None) for w in name_words(name)} for src in sources]
             for name in class_names]
    missing = [f"class {name!r}: word {w!r} not in {s}" for name, halves in zip(class_names, found)
               for s, words in zip(source_names, halves) for w, v in words.items() if v is None]
    _check(not missing, f"{len(missing)} class word(s) missing from the word vectors:\n  " + "\n  ".join(missing),
           EmbeddingError)
    table = np.stack([np.concatenate([np.mean([np.asarray(v, np.float64) for v in words.values()], axis=0)
                                      for words in halves]) for halves in found])  # (C, D)
    table /= np.linalg.norm(_finite_rows(table, class_names, " + ".join(source_names)), axis=1, keepdims=True)
    return torch.from_numpy(table).float()


def _finite_rows(table: np.ndarray, class_names: list[str], where) -> np.ndarray:
    """``table``, unless a class's row is all zero or holds NaN, inf or |v| >= 1e6 (word vectors are of
    order 1), which would surface only later, as a non-finite loss naming no class."""
    bad = [repr(n) for n, row in zip(class_names, table) if not (np.abs(row) < 1e6).all() or not row.any()]
    _check(not bad, f"{where}: the vector of class(es) {', '.join(bad)} is all zero or holds NaN, inf or "
           "values of 1e6 and more; expected finite word vectors", EmbeddingError)
    return table


def load_class_embeddings(paths, class_names: list[str], *, dim: int = 600, raw_ids=None, order: str = "raw",
                          cache: bool = True) -> torch.Tensor:
    """The (C, dim) table for `class_names`: from word-vector files (word2vec `.bin`, fastText `.vec`, or
    `.gz`; a half each; cached as `<first file>.<hash>.npy`), or one `.npy` in `order` "raw" or "model"."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if given := len(paths) == 1 and paths[0].suffix == ".npy":
        table_path = paths[0]
    else:
        key = json.dumps([class_names, [(p.name, p.stat().st_size if p.is_file() else 0) for p in paths]])
        table_path = paths[0].with_name(f"{paths[0].name}.{hashlib.sha1(key.encode()).hexdigest()[:12]}.npy")
    if given or (cache and table_path.is_file()):
        try:
            table = np.load(table_path)
        except (OSError, ValueError) as e:
            raise EmbeddingError(f"embedding table {table_path} is missing or not a .npy array: {e}") from e
    else:
        wanted = {v for n in class_names for w in name_words(n) for v in _variants(w)}
        sources = [(read_fasttext_vec if ".vec" in p.suffixes else read_word2vec_binary)(p, wanted) for p in paths]
        table = class_embedding_table(class_names, sources, source_names=[p.name for p in paths]).numpy()
        if table.shape[1] != dim:
            widths = " + ".join(f"{p.name} {len(next(iter(s.values())))}" for p, s in zip(paths, sources))
            raise EmbeddingError(f"{widths} = {table.shape[1]}-d class embeddings, expected {dim}-d")
        if cache:
            try:
                np.save(table_path, table)
            except OSError as e:  # a read-only folder only costs re-reading the vectors next time
                warnings.warn(f"could not cache the class embeddings at {table_path}: {e}")
    if given:  # rows in raw-id or model order: README "Class embeddings"
        _check(order in ("raw", "model"), f"load_class_embeddings: order must be 'raw' or 'model', got {order!r}",
               ValueError)
        _check(order == "model" or raw_ids is not None, "load_class_embeddings: order='raw' needs raw_ids (the "
               f"dataset's raw id of each class) to read {table_path}; or pass order='model'", ValueError)
        rows, d = table.shape if table.ndim == 2 else (None, "D")
        raw = f"({len(raw_ids)}, {d}) or ({max(raw_ids) + 1}, {d})" if raw_ids is not None else "(no raw ids given)"
        _check(rows in (len(raw_ids), max(raw_ids) + 1) if order == "raw" else rows == len(class_names),
               f"{table_path}: shape {table.shape} fits neither row order: raw-id order (--embeddings-order raw) "
               f"expects shape {raw}, model order (--embeddings-order model) ({len(class_names)}, {d})", EmbeddingError)
        if order == "raw":  # a row per class, or per raw value 0..max
            table = table[[sorted(raw_ids).index(r) for r in raw_ids] if rows == len(raw_ids) else list(raw_ids)]
    _check(table.shape == (len(class_names), dim), f"{table_path}: shape {table.shape}, expected "
           f"({len(class_names)}, {dim}) for classes {', '.join(class_names)}", EmbeddingError)
    _finite_rows(table, class_names, table_path)  # a .npy table; word vectors were checked before caching
    return torch.as_tensor(table, dtype=torch.float32)


def added_class_embeddings(dataset: str, names: list[str], paths=None, *, dim: int = 600) -> torch.Tensor:
    """M's rows for class names added after training, by the rules of training: for ``shapes`` its
    seeded vectors (vocabulary: the words of its class names), else the word-vector files ``paths``."""
    if dataset == "shapes":
        _check(not paths, "--embeddings: shapes makes its own seeded word vectors; the flag is for voc, "
               "context and cocostuff", EmbeddingError)
        vocabulary = {w.lower() for n in SHAPES_RAW for w in name_words(n)}
        missing = [f"class {n!r}: word {w!r}" for n in names for w in name_words(n) if w.lower() not in vocabulary]
        _check(not missing, f"not in the shapes vocabulary ({', '.join(sorted(vocabulary))}): "
               + "; ".join(missing), EmbeddingError)
        return shapes_embeddings([n.lower() for n in names], dim=dim)
    _check(paths and all(Path(p).suffix != ".npy" for p in paths), f"--embeddings: new {dataset} class names need the "
           "word-vector files of training (.bin, .vec); a .npy table has no rows for them", EmbeddingError)
    return load_class_embeddings(paths, list(names), dim=dim, cache=False)


def shapes_embeddings(class_names: list[str], *, seed: int = 0, dim: int = 600) -> torch.Tensor:
    """Two seeded pseudo-random unit vectors per word stand in for word2vec and fastText."""
    _check(dim % 2 == 0, f"shapes_embeddings: dim must be even (two halves), got {dim}", ValueError)
    draws = [{w: np.random.default_rng([seed, s, zlib.crc32(w.encode())]).standard_normal(dim // 2)
              for n in class_names for w in name_words(n)} for s in range(2)]  # (dim / 2,) per word and source
    sources = [{w: v / np.linalg.norm(v) for w, v in source.items()} for source in draws]
    return class_embedding_table(class_names, sources, source_names=["shapes-word2vec", "shapes-fasttext"])


# ------------------------------------------------------------------ 5. shapes (PROTOCOL section 7)
SHAPES_STUFF = ["sky", "water", "grass", "sand"]
SHAPES_COLOURS = {"red": (0.85, 0.15, 0.12), "green": (0.15, 0.70, 0.20), "blue": (0.15, 0.25, 0.85),
                  "yellow": (0.95, 0.85, 0.15)}
SHAPES_FORMS = ["circle", "square", "triangle", "cross"]
SHAPES_RAW = SHAPES_STUFF + [f"{c} {f}" for c in SHAPES_COLOURS for f in SHAPES_FORMS]  # raw ids 0-19
SHAPES_UNSEEN = ["red triangle", "green cross", "blue circle", "yellow square"]  # a Latin square
SHAPES_LAYOUTS = ("context", "uniform")  # where things stand; the first is the default
SHAPES_FLY = [0, 3]  # form indices of the things that fly (circle, cross); the others stand
SHAPES_OWN_BAND = 0.8  # probability that a thing's centre lies in its own band (layout context)
_STUFF_RGB = np.array([(0.45, 0.65, 0.90), (0.45, 0.65, 0.90), (0.33, 0.56, 0.24), (0.86, 0.77, 0.55)])
_SHAPES_PALETTE = np.array([(150, 200, 255), (20, 60, 200), (40, 140, 40), (230, 200, 120)] + [
    [round(255 * c * (1 - 0.22 * f)) for c in rgb] for rgb in SHAPES_COLOURS.values() for f in range(4)], np.uint8)


def _shapes_scenes(n: int, seed: int, split: str, layout: str = "context") -> dict[str, np.ndarray]:
    """Scene parameters in relative coordinates (for any render size), each from its own random stream:
    the first k scenes are the same for any n >= k; ``layout="uniform"`` draws the first version's."""
    _check(layout in SHAPES_LAYOUTS, f"Shapes: layout must be one of {SHAPES_LAYOUTS}, got {layout!r}", ValueError)
    rng = [np.random.default_rng(s) for s in np.random.SeedSequence([seed, split == "test"]).spawn(10)]
    stuff_rgb = _STUFF_RGB + rng[0].uniform(-0.06, 0.06, (n, 4, 3))  # (n, 4, 3) per-image stuff colours
    stuff_rgb[:, 1] = stuff_rgb[:, 0]  # water looks exactly like sky: only position tells them apart
    thing = rng[1].integers(0, 16, (n, 3))  # colour * 4 + form
    scenes = {"stuff_rgb": stuff_rgb, "thing": thing,
              "thing_rgb": np.array(list(SHAPES_COLOURS.values()))[thing // 4] + rng[2].uniform(-0.05, 0.05, (n, 3, 3)),
              "horizon": rng[3].uniform(0.35, 0.65, n),  # horizon height / image height
              "bottom": rng[4].integers(1, 4, n),  # water, grass or sand
              "count": rng[5].integers(1, 4, n),  # things 0..count-1 are drawn, in order
              "centre": rng[6].uniform(0.1, 0.9, (n, 3, 2)),  # (y, x) / image size
              "radius": rng[7].uniform(6, 13, (n, 3)) / 64}  # radius in pixels / base_size
    if layout == "context":  # a thing's centre height: uniform in its own band, or in the other one
        flies = np.isin(thing % 4, SHAPES_FLY)  # (n, 3); colour (thing // 4) plays no part
        above = flies == (rng[8].random((n, 3)) < SHAPES_OWN_BAND)
        horizon, r = scenes["horizon"][:, None], scenes["radius"]
        low, high = np.where(above, 0.1, horizon + r), np.where(above, horizon - r, 0.9)  # clear of the horizon
        scenes["centre"][..., 0] = low + (high - low) * rng[9].random((n, 3))
    return scenes


def _render_shapes(scenes: dict, size: int, base_size: int, noise: float, generator: torch.Generator):
    """Scenes -> uint8 images (n, 3, S, S) and raw labels (n, S, S): ids 0-19, 255 void."""
    sc = {k: torch.as_tensor(v) for k, v in scenes.items()}
    n, S = len(sc["horizon"]), size
    pix = torch.arange(S, dtype=torch.float32) + 0.5  # pixel centres
    sky = pix.view(1, S, 1) < (sc["horizon"] * S).view(n, 1, 1)  # (n, S, 1)
    label = torch.where(sky, 0, sc["bottom"].view(n, 1, 1)).expand(n, S, S).clone()  # (n, S, S)
    rgb = sc["stuff_rgb"].float()
    image = torch.where(sky[:, None], rgb[:, 0, :, None, None], rgb[torch.arange(n), sc["bottom"], :, None, None])
    # Centres scale with the image, radii do not: things keep their pixel size at any `size`.
    cy, cx = (sc["centre"].float() * S).unbind(-1)  # (n, 3) each
    r = (sc["radius"].float() * base_size)[..., None, None]  # (n, 3, 1, 1)
    dy, dx = pix.view(1, 1, S, 1) - cy[..., None, None], pix.view(1, 1, 1, S) - cx[..., None, None]
    ady, adx = dy.abs(), dx.abs()
    forms = torch.stack([dy ** 2 + dx ** 2 <= r ** 2,  # circle
                         torch.maximum(ady, adx) <= 0.85 * r,  # square
                         (dy <= r / 2) & (adx <= (dy + r) / 3 ** 0.5),  # triangle, apex up, centroid at centre
                         (torch.minimum(ady, adx) <= 0.3 * r) & (torch.maximum(ady, adx) <= r)])  # cross
    mask = forms.gather(0, (sc["thing"] % 4)[None, ..., None, None].expand(1, n, 3, S, S))[0]  # (n, 3, S, S)
    mask &= (torch.arange(3) < sc["count"][:, None])[..., None, None]
    instance = torch.zeros(n, S, S, dtype=torch.long)
    for k in range(3):  # later things are drawn over earlier ones
        m = mask[:, k]
        image = torch.where(m[:, None], sc["thing_rgb"][:, k, :, None, None].float(), image)
        label = torch.where(m, 4 + sc["thing"][:, k, None, None], label)
        instance = torch.where(m, k + 1, instance)
    # Void: pixels with a later-drawn thing among their 8 neighbours, a 1-px ring as VOC draws round objects.
    label[nnf.max_pool2d(instance[:, None].float(), 3, 1, 1)[:, 0] > instance] = IGNORE
    # A [1 2 1]/4 blur in both directions softens edges as a lens would; then pixel noise.
    image = nnf.pad(image, (1, 1, 1, 1), mode="replicate")
    image = (image[..., :-2, :] + 2 * image[..., 1:-1, :] + image[..., 2:, :]) / 4
    image = (image[..., :-2] + 2 * image[..., 1:-1] + image[..., 2:]) / 4
    image = image + noise * torch.randn(image.shape, generator=generator)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), label.to(torch.uint8)


class Shapes(_Segmentation):
    """The built-in benchmark (README "The built-in benchmark `shapes`"): the `scenes` of `seed` and `layout`, rendered
    once at `size` into `images` (N, 3, S, S) uint8 and `labels` (N, S, S) uint8 (model indices, 255 ignore)."""
    raw_names, unseen, num_values = dict(enumerate(SHAPES_RAW)), SHAPES_UNSEEN, 20
    # The default training set's pixel statistics: ImageNet's would leave the blue channel at mean 1.2.
    mean, std = (0.50, 0.64, 0.69), (0.20, 0.13, 0.28)

    def __init__(self, split: str, *, size: int = 64, num_images: int | None = None, seed: int = 0,
                 transform=None, base_size: int = 64, noise: float = 0.04, layout: str = "context"):
        _check(size >= 8 and base_size >= 8 and (num_images is None or num_images >= 1), "Shapes: need size, "
               f"base_size >= 8 and num_images >= 1; got {size}, {base_size}, {num_images}", ValueError)
        super().__init__(split, transform)
        self.size, self.palette = size, _SHAPES_PALETTE[self.raw_ids]
        n = num_images if num_images is not None else (2000 if split == "train" else 300)
        self.layout, self.scenes = layout, _shapes_scenes(n, seed, split, layout)
        noise_seed = np.random.SeedSequence([seed, split == "test", size]).generate_state(1)[0]
        g = torch.Generator().manual_seed(int(noise_seed))  # noise, unlike the scenes, depends on size
        chunks = [_render_shapes({k: v[i:i + 256] for k, v in self.scenes.items()}, size, base_size, noise, g)
                  for i in range(0, n, 256)]  # chunks bound the memory of the (n, 3, S, S) masks
        self.images, labels = map(torch.cat, zip(*chunks))  # (N, 3, S, S) uint8, (N, S, S) raw ids
        self.labels = torch.from_numpy(self.lut)[labels.long()].to(torch.uint8)  # (N, S, S) model indices
        self._unseen = torch.from_numpy(self.unseen_values)[labels.long()].flatten(1).any(1).numpy()  # (N,)

    def __len__(self) -> int:
        return len(self.images)

    def holds_unseen(self, quiet: bool = False) -> np.ndarray:
        return self._unseen

    def keep(self, which: np.ndarray) -> None:
        self.images, self.labels, self._unseen = self.images[which], self.labels[which], self._unseen[which]
        self.scenes = {k: v[which] for k, v in self.scenes.items()}

    def __getitem__(self, i: int):
        return self._finish(self.images[i], self.labels[i])


# ------------------------------------------------------------------ 6. factory, preview, CLI
DATASETS = {"voc": VOC, "context": Context33, "cocostuff": COCOStuff, "shapes": Shapes}
# (classes, unseen classes) of each benchmark, for what needs no files (train.py --benchmark)
CLASS_COUNTS = {name: (len(cls.raw_names), len(cls.unseen)) for name, cls in DATASETS.items()}


def build_dataset(name: str, split: str, *, root=None, **kwargs):
    _check(name in DATASETS, f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}", ValueError)
    _check(name == "shapes" or root is not None, f"dataset {name!r} needs a root folder (--data-root)", ValueError)
    return Shapes(split, **kwargs) if name == "shapes" else DATASETS[name](root, split, **kwargs)


def label_colours(num_classes: int, palette: np.ndarray | None = None) -> np.ndarray:
    """(256, 3) uint8, each label id's colour in every picture: a dataset's ``palette``, else (and for added
    classes) VOC's colour map shifted by one, no class black (bit b of k + 1 to channel b % 3, bit 7 - b // 3)."""
    bits = (np.arange(1, num_classes + 1)[:, None, None] >> np.arange(24).reshape(8, 3)) & 1  # (K, 8, 3)
    colours = np.zeros((256, 3), np.uint8)
    colours[:num_classes] = (bits << (7 - np.arange(8))[:, None]).sum(1)  # (K, 3)
    if palette is not None:
        colours[:min(len(palette), num_classes)] = np.asarray(palette)[:num_classes]
    return colours


def save_preview(dataset, path, *, num: int = 8, cols: int = 2, size: int | None = None) -> None:
    """A PNG grid of `image | label` pairs; labels in `label_colours`, ignore (255) black."""
    colours = torch.from_numpy(label_colours(len(dataset.class_names), getattr(dataset, "palette", None)))
    mean, std = torch.tensor(dataset.mean).view(3, 1, 1), torch.tensor(dataset.std).view(3, 1, 1)
    pairs = []
    for image, label in (dataset[i] for i in range(min(num, len(dataset)))):
        image = ((image * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)  # undo the normalisation
        if size:
            image, label = F.resize(image, [size, size]), F.resize(tv_tensors.Mask(label), [size, size])  # nearest
        pairs.append(torch.cat([image, colours[label].permute(2, 0, 1)], dim=2))  # (3, H, 2W)
    grid = make_grid(pairs, nrow=cols, padding=4, pad_value=255)[:, 2:-2, 2:-2]  # (3, H', W'): 2 px round each
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path, optimize=True)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Check that a dataset loads; optionally draw a few samples.")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="shapes", help="dataset (default: shapes)")
    p.add_argument("--data-root", type=Path, default=Path("data"), help="real datasets' folder (default: data)")
    p.add_argument("--split", choices=["train", "test"], default="train", help="split (default: train)")
    p.add_argument("--size", type=int, default=64, help="shapes render size and preview tile size (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="shapes scene seed (default: 0)")
    p.add_argument("--layout", choices=SHAPES_LAYOUTS, default="context", help="shapes layout (default: context)")
    p.add_argument("--preview", type=Path, help="write a PNG grid of samples (image | label) to this file")
    p.add_argument("--num-samples", type=int, default=8, help="samples in the preview (default: 8)")
    p.add_argument("--all", action="store_true", help="read every item of both splits (a progress bar), list "
                   "every file that fails, exit 1 if any does; without it, only item 0 of --split is read")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    kwargs = {"size": args.size, "seed": args.seed, "layout": args.layout} if args.dataset == "shapes" else {}
    try:
        for flag, n, low in ("--size", args.size, 8), ("--num-samples", args.num_samples, 1), ("--seed", args.seed, 0):
            _check(n >= low, f"{flag} must be >= {low}, got {n}", ValueError)
        _check(not args.preview or args.preview.suffix.lower() in Image.registered_extensions(),
               f"--preview {args.preview}: expected an image file name such as preview.png", ValueError)
        dataset = build_dataset(args.dataset, args.split, root=args.data_root,
                                **kwargs, **{"num_images": args.num_samples} if kwargs and not args.all else {})
        print(f"{args.dataset} {args.split}: {len(dataset)} images; {dataset.num_seen} seen classes: "
              f"{', '.join(dataset.class_names[:dataset.num_seen])}; {dataset.num_unseen} unseen: "
              f"{', '.join(dataset.class_names[dataset.num_seen:])}")
        if not args.all:  # reading one item surfaces format errors now
            print("item 0: image {}, label {}".format(*(tuple(t.shape) for t in dataset[0])))
        else:  # read every item of both splits, naming each that fails
            bad = []
            for split in ("train", "test"):
                ds = build_dataset(args.dataset, split, root=args.data_root, **kwargs)
                for i in tqdm(range(len(ds)), desc=f"{args.dataset} {split}", dynamic_ncols=True):
                    try:
                        ds[i]
                    except DatasetError as e:
                        bad.append(split)
                        tqdm.write(f"data.py: bad {split} item {i}: {e}", file=sys.stderr)
                if split == "train" and not bad:
                    kept = ds.choose_images("ignore")
                    print(f"train: {kept['ignore']} images with --unseen-images ignore, {kept['drop']} with drop")
            print(f"{len(bad)} bad item(s)" if bad else "every item of both splits reads")
            if bad:
                return 1
        if args.preview:
            try:
                save_preview(dataset, args.preview, num=args.num_samples, size=args.size)
            except OSError as e:
                raise DatasetError(f"--preview {args.preview}: cannot write it ({e.strerror or e})") from None
            print(f"wrote {args.preview}")
    except (DatasetError, ValueError) as e:
        print(f"data.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""data.py: real-format readers on tiny files written here, the seen/unseen protocol,
class embeddings, the `shapes` benchmark, and the documented errors for bad input."""
import gzip
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from torchvision import tv_tensors

import data
from data import DatasetError, EmbeddingError

pytestmark = pytest.mark.data

MEAN, STD = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(data.IMAGENET_STD).view(3, 1, 1)


# ------------------------------------------------------------------ writers for tiny datasets
def voc_colour_map(n: int = 256) -> list[int]:
    """The VOC palette: bits of the index spread over R, G, B from the high bit down."""
    cmap = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap += [r, g, b]
    return cmap


def write_jpeg(path, h: int, w: int, seed: int = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, quality=95)


def write_label(path, values, *, palette: bool = False):
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.asarray(values, dtype=np.uint8)
    if palette:
        im = Image.frombytes("P", values.shape[::-1], values.tobytes())
        im.putpalette(voc_colour_map())
    else:
        im = Image.fromarray(values)
    im.save(path)


def tile(values) -> np.ndarray:
    """A (2, 4) pattern repeated to a (6, 8) label, so JPEG sizes are not degenerate."""
    return np.tile(np.asarray(values), (3, 2))


VOC_RAW = [[0, 1, 2, 15], [16, 20, 255, 5]]
VOC_TRAIN = [[255, 0, 1, 14], [255, 255, 255, 4]]  # background, unseen and void -> 255
VOC_TEST = [[255, 0, 1, 14], [15, 19, 255, 4]]  # unseen kept: potted plant ... tv monitor are 15-19


def make_voc(root, *, pairs_format: bool = False):
    top = root / "VOCdevkit" / "VOC2012"
    for i, name in enumerate(["a", "b"]):
        write_jpeg(top / "JPEGImages" / f"{name}.jpg", 6, 8, seed=i)
    write_label(top / "SegmentationClassAug" / "a.png", tile(VOC_RAW))  # grayscale aug label
    write_label(top / "SegmentationClass" / "b.png", tile(VOC_RAW), palette=True)  # official palette label
    (top / "ImageSets" / "Segmentation").mkdir(parents=True)
    lines = ["/JPEGImages/a.jpg /SegmentationClassAug/a.png", "/JPEGImages/b.jpg /SegmentationClassAug/b.png"] \
        if pairs_format else ["a", "b"]
    (top / "ImageSets/Segmentation/train_aug.txt").write_text("\n".join(lines) + "\n")
    (top / "ImageSets/Segmentation/val.txt").write_text("a\nb\n")
    return top


# 59-class values: unlabelled, aeroplane, bag, cat, sky, table, cow, wood
CONTEXT_RAW = [[0, 1, 2, 15], [47, 50, 20, 59]]
CONTEXT_TRAIN = [[255, 0, 255, 255], [16, 8, 255, 255]]
CONTEXT_TEST = [[255, 0, 255, 29], [16, 8, 30, 255]]


def make_context(root):
    top = root / "VOCdevkit" / "VOC2010"
    write_jpeg(top / "JPEGImages" / "c.jpg", 6, 8)
    write_label(top / "SegmentationClassContext" / "c.png", tile(CONTEXT_RAW))
    (top / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    for lst in ["train", "val"]:
        (top / "ImageSets/SegmentationContext" / f"{lst}.txt").write_text("c\n")
    return top


# COCO-Stuff values: person, street sign (never occurs), frisbee, wood, unlabelled, cow, sky-other, river
COCO_RAW = [[0, 11, 33, 181], [255, 20, 156, 147]]
COCO_TRAIN = [[0, 255, 255, 155], [255, 255, 132, 255]]
COCO_TEST = [[0, 255, 159, 155], [255, 156, 132, 167]]


def make_coco(root):
    top = root / "coco_stuff164k"
    for sub in ["train2017", "val2017"]:
        write_jpeg(top / "images" / sub / "000000000009.jpg", 6, 8)
        write_label(top / "annotations" / sub / "000000000009.png", tile(COCO_RAW))
    return top


# ------------------------------------------------------------------ real formats
@pytest.mark.parametrize("pairs_format", [False, True])
def test_voc_palette_and_aug_pngs_load_with_the_protocol_labels_in_both_splits(tmp_path, pairs_format):
    make_voc(tmp_path, pairs_format=pairs_format)
    train, test = data.VOC(tmp_path, "train"), data.VOC(tmp_path / "VOCdevkit" / "VOC2012", "val")
    assert (len(train), len(test), train.num_seen, train.num_unseen) == (2, 2, 15, 5)
    assert train.class_names[15:] == ["potted plant", "sheep", "sofa", "train", "tv monitor"]
    assert train.pairs[1][1].parent.name == "SegmentationClass"  # the official palette PNG is used
    for ds, expected in [(train, VOC_TRAIN), (test, VOC_TEST)]:
        for i in range(2):
            image, label = ds[i]
            assert image.dtype == torch.float32 and image.shape == (3, 6, 8)
            assert label.dtype == torch.int64 and torch.equal(label, torch.tensor(tile(expected)))


def test_context33_reads_59_class_pngs_by_name(tmp_path):
    make_context(tmp_path)
    train, test = data.Context33(tmp_path, "train"), data.Context33(tmp_path, "test")
    assert (train.num_seen, train.num_unseen) == (29, 4)
    assert train.class_names[29:] == ["cat", "cow", "motorbike", "sofa"]  # raw-id order
    assert torch.equal(train[0][1], torch.tensor(tile(CONTEXT_TRAIN)))
    assert torch.equal(test[0][1], torch.tensor(tile(CONTEXT_TEST)))


def test_context_59_to_33_mapping_is_pinned_to_the_protocol_lists():
    # PROTOCOL section 3: 59-class value -> 33-class id, matched by name ("table" is VOC's dining table).
    expected = {1: 1, 6: 2, 7: 3, 8: 4, 10: 5, 12: 6, 14: 7, 15: 8, 17: 9, 20: 10, 50: 11, 23: 12, 31: 13,
                34: 14, 37: 15, 40: 16, 43: 17, 49: 18, 52: 19, 55: 20, 47: 21, 29: 22, 30: 23, 41: 24,
                11: 25, 53: 26, 57: 27, 35: 28, 56: 29, 26: 30, 51: 31, 32: 32, 16: 33}
    assert data.CONTEXT59_TO_33 == expected
    assert data.CONTEXT33_CLASSES[20:] == ["sky", "grass", "ground", "road", "building", "tree", "water",
                                           "mountain", "wall", "floor", "track", "keyboard", "ceiling"]
    assert data.CONTEXT59_CLASSES[49] == "table" and len(data.CONTEXT59_CLASSES) == 59


def test_cocostuff_ids_map_to_171_classes_with_15_unseen(tmp_path):
    make_coco(tmp_path)
    train, test = data.COCOStuff(tmp_path, "train"), data.COCOStuff(tmp_path / "coco_stuff164k", "test")
    assert (train.num_seen, train.num_unseen) == (156, 15)
    assert set(train.class_names[156:]) == set(data.COCO_STUFF_UNSEEN)
    assert "street sign" not in train.class_names and len(set(train.class_names)) == 171
    assert torch.equal(train[0][1], torch.tensor(tile(COCO_TRAIN)))
    assert torch.equal(test[0][1], torch.tensor(tile(COCO_TEST)))


@pytest.fixture(scope="module")
def real_datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    make_voc(root), make_context(root), make_coco(root)
    return {(name, split): cls(root, split) for name, cls in
            [("voc", data.VOC), ("context", data.Context33), ("coco", data.COCOStuff)] for split in ["train", "test"]}


RAW_NAMES = {"voc": dict(enumerate(data.VOC_CLASSES, 1)),
             "context": {v: data.CONTEXT33_CLASSES[c - 1] for v, c in data.CONTEXT59_TO_33.items()},
             "coco": {v: n for v, n in enumerate(data.COCO_STUFF_CLASSES) if v not in data.COCO_STUFF_ABSENT}}
NUM_VALUES = {"voc": 21, "context": 60, "coco": 182}
UNSEEN = {"voc": {"potted plant", "sheep", "sofa", "train", "tv monitor"},
          "context": {"cow", "motorbike", "sofa", "cat"},
          "coco": {"frisbee", "skateboard", "cardboard", "carrot", "scissors", "suitcase", "giraffe", "cow", "road",
                   "wall-concrete", "tree", "grass", "river", "clouds", "playingfield"}}
RAW_ORDER = {"voc": data.VOC_CLASSES, "context": data.CONTEXT33_CLASSES,
             "coco": [n for v, n in enumerate(data.COCO_STUFF_CLASSES) if v not in data.COCO_STUFF_ABSENT]}
MODEL_ORDER = {k: [n for n in names if n not in UNSEEN[k]] + [n for n in names if n in UNSEEN[k]]
               for k, names in RAW_ORDER.items()}


@given(st.sampled_from(["voc", "context", "coco"]), st.sampled_from(["train", "test"]),
       st.lists(st.integers(0, 255), min_size=1, max_size=50))
def test_every_raw_value_maps_as_the_naive_per_pixel_rule_says(real_datasets, name, split, values):
    ds = real_datasets[name, split]
    assert ds.class_names == MODEL_ORDER[name] and ds.num_unseen == len(UNSEEN[name])
    for v in values:
        got = ds.lut[v]
        if v >= NUM_VALUES[name] and v != 255:
            assert got == -1  # not a raw id of this dataset: reading such a file raises
        elif v not in RAW_NAMES[name]:
            assert got == 255  # background, unlabelled, void, never-occurring ids
        elif split == "train" and RAW_NAMES[name][v] in UNSEEN[name]:
            assert got == 255
        else:
            assert got == MODEL_ORDER[name].index(RAW_NAMES[name][v])


def test_class_counts_need_no_files_and_match_the_readers(real_datasets):
    assert data.CLASS_COUNTS == {"voc": (20, 5), "context": (33, 4), "cocostuff": (171, 15), "shapes": (20, 4)}
    for name, key in [("voc", "voc"), ("context", "context"), ("cocostuff", "coco")]:
        ds = real_datasets[key, "test"]
        assert (len(ds.class_names), ds.num_unseen) == data.CLASS_COUNTS[name]


def test_seen_classes_precede_unseen_in_raw_order(real_datasets):
    voc, context = real_datasets["voc", "train"], real_datasets["context", "test"]
    assert voc.raw_ids == list(range(1, 21)) and voc.num_seen == 15
    assert context.raw_ids[29:] == [8, 10, 14, 18] and context.raw_ids[:8] == [1, 2, 3, 4, 5, 6, 7, 9]


def test_item_without_transform_is_normalised_and_never_resized(tmp_path):
    top = make_voc(tmp_path)
    image, _ = data.VOC(tmp_path, "test")[0]
    pixels = torch.from_numpy(np.array(Image.open(top / "JPEGImages" / "a.jpg"))).permute(2, 0, 1)
    torch.testing.assert_close(image, (pixels / 255 - MEAN) / STD)


# ------------------------------------------------------------------ transforms
def wrap(image, label):
    return tv_tensors.Image(image), tv_tensors.Mask(label)


def coded_pair(h: int = 10, w: int = 12):
    """An image whose red channel is 10 x label, so alignment survives crop and flip."""
    label = torch.randint(0, 20, (h, w))
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    image[0] = (label * 10).to(torch.uint8)
    return image, label


@pytest.mark.parametrize("crop", [8, 16])
def test_train_transform_keeps_image_and_label_aligned_and_pads_with_the_padding_label(crop):
    torch.manual_seed(0)
    transform = data.train_transform(crop, scale=(1.0, 1.0))
    for _ in range(20):
        image, label = transform(*wrap(*coded_pair()))
        assert image.shape == (3, crop, crop) and label.shape == (crop, crop)
        red = ((image * STD + MEAN)[0] * 255).round()
        padded = label == data.PADDING
        assert torch.equal(red[~padded], label[~padded].float() * 10)
        assert (red[padded] == 0).all()
        assert padded.sum() == max(crop * crop - 10 * 12, 0)  # exactly the crop's area outside the image


def test_unlabelled_pixels_inside_the_image_stay_ignore_and_only_padding_gets_the_padding_label():
    image, label = coded_pair()
    label[:, :3] = data.IGNORE  # e.g. VOC background or an unseen class in a training image
    _, out = data.train_transform(16, scale=(1.0, 1.0))(*wrap(image, label))
    assert (out == data.IGNORE).sum() == 10 * 3 and (out == data.PADDING).sum() == 16 * 16 - 10 * 12


def test_random_scale_resizes_labels_nearest():
    torch.manual_seed(0)
    image, label = coded_pair()
    out_image, out_label = data.RandomScale((2.0, 2.0))(*wrap(image, label))
    assert out_image.shape == (3, 20, 24) and out_label.shape == (20, 24)
    assert torch.equal(out_label[::2, ::2], label)  # nearest: no new label values appear


def test_eval_transform_keeps_the_size_or_warps_to_a_square():
    image, label = coded_pair()
    i, lab = data.eval_transform()(*wrap(image, label))
    assert i.shape == (3, 10, 12) and torch.equal(lab, label)
    i, lab = data.eval_transform(20)(*wrap(image, label))
    assert i.shape == (3, 20, 20) and lab.shape == (20, 20)
    assert set(lab.unique().tolist()) <= set(label.unique().tolist())  # nearest: no new label values


# ------------------------------------------------------------------ class embeddings
VECTORS = {"red": [1.0, 0.0, 2.0], "triangle": [0.0, 3.0, 0.0], "sky": [0.5, 0.5, 0.5]}


def write_word2vec(path, vectors, *, newline: bool):
    d = len(next(iter(vectors.values())))
    with open(path, "wb") as f:
        f.write(f"{len(vectors)} {d}\n".encode())
        for word, v in vectors.items():
            f.write(word.encode() + b" " + np.asarray(v, "<f4").tobytes() + (b"\n" if newline else b""))


def write_vec(path, vectors, *, header: bool = True):
    d = len(next(iter(vectors.values())))
    lines = [f"{w} {' '.join(map(str, v))} " for w, v in vectors.items()]  # fastText leaves a trailing space
    lines = ([f"{len(vectors)} {d}"] if header else []) + lines
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("newline, gz", [(True, False), (False, False), (True, True)])
def test_read_word2vec_binary_reads_all_or_only_the_wanted_words(tmp_path, newline, gz):
    write_word2vec(tmp_path / "w.bin", VECTORS, newline=newline)
    path = tmp_path / "w.bin"
    if gz:
        path = tmp_path / "w.bin.gz"
        path.write_bytes(gzip.compress((tmp_path / "w.bin").read_bytes()))
    got = data.read_word2vec_binary(path)
    assert got.keys() == VECTORS.keys()
    for w, v in VECTORS.items():
        np.testing.assert_array_equal(got[w], np.float32(v))
    assert data.read_word2vec_binary(path, words={"sky", "absent"}).keys() == {"sky"}


@pytest.mark.parametrize("header", [True, False])
def test_read_fasttext_vec_with_and_without_header(tmp_path, header):
    write_vec(tmp_path / "f.vec", VECTORS, header=header)
    got = data.read_fasttext_vec(tmp_path / "f.vec")
    assert got.keys() == VECTORS.keys()
    np.testing.assert_array_equal(got["triangle"], np.float32(VECTORS["triangle"]))
    assert data.read_fasttext_vec(tmp_path / "f.vec", words=["red"]).keys() == {"red"}


def test_multi_word_names_average_each_source_then_concatenate_and_normalise():
    s1 = {"red": [1.0, 0.0], "triangle": [0.0, 1.0], "sky": [3.0, 4.0]}
    s2 = {"Red": [2.0, 0.0, 0.0], "triangle": [0.0, 0.0, 4.0], "sky": [0.0, 0.0, 0.0]}  # "red" found as "Red"
    table = data.class_embedding_table(["red triangle", "sky"], [s1, s2])
    # red triangle: s1 mean (0.5, 0.5), s2 mean (1, 0, 2); |.|^2 = 0.25 + 0.25 + 1 + 4 = 5.5
    row = torch.tensor([0.5, 0.5, 1.0, 0.0, 2.0]) / math.sqrt(5.5)
    torch.testing.assert_close(table[0], row)
    torch.testing.assert_close(table[1], torch.tensor([0.6, 0.8, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(data.class_embedding_table(["red_triangle"], [s1, s2])[0], row)  # "_" splits words


def test_missing_words_error_names_every_class_and_word():
    with pytest.raises(EmbeddingError) as e:
        data.class_embedding_table(["red triangle", "wall-concrete", "sky"], [VECTORS, {"sky": [1.0]}],
                                   source_names=["w2v", "ft"])
    msg = str(e.value)
    for part in ["'wall-concrete': word 'wall' not in w2v", "'concrete' not in w2v", "'red' not in ft",
                 "'triangle' not in ft", "'wall' not in ft"]:
        assert part in msg
    assert "'sky'" not in msg


def test_load_class_embeddings_builds_from_bin_and_vec_and_caches(tmp_path, monkeypatch):
    write_word2vec(tmp_path / "w.bin", VECTORS, newline=True)
    write_vec(tmp_path / "f.vec", {w: [x + 1 for x in v] for w, v in VECTORS.items()})
    paths = [tmp_path / "w.bin", tmp_path / "f.vec"]
    table = data.load_class_embeddings(paths, ["sky", "red triangle"], dim=6)
    expected = data.class_embedding_table(["sky", "red triangle"], [data.read_word2vec_binary(paths[0]),
                                                                     data.read_fasttext_vec(paths[1])])
    torch.testing.assert_close(table, expected)
    assert len(list(tmp_path.glob("w.bin.*.npy"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("the cached table should have been used")
    monkeypatch.setattr(data, "read_word2vec_binary", fail)
    torch.testing.assert_close(data.load_class_embeddings(paths, ["sky", "red triangle"], dim=6), table)


def test_load_class_embeddings_accepts_a_npy_table_in_model_or_raw_order(tmp_path):
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.save(tmp_path / "t.npy", table)
    model = data.load_class_embeddings(tmp_path / "t.npy", list("abcd"), dim=3, order="model")
    torch.testing.assert_close(model, torch.tensor(table))
    with pytest.raises(ValueError, match="order='raw' needs raw_ids"):
        data.load_class_embeddings(tmp_path / "t.npy", list("abcd"), dim=3)  # raw, the default, needs the ids
    by_value = data.load_class_embeddings(tmp_path / "t.npy", list("ab"), dim=3, raw_ids=[3, 1], order="raw")
    torch.testing.assert_close(by_value, torch.tensor(table[[3, 1]]))  # 4 rows = raw values 0-3
    ranked = data.load_class_embeddings(tmp_path / "t.npy", list("abcd"), dim=3, raw_ids=[7, 2, 9, 5], order="raw")
    torch.testing.assert_close(ranked, torch.tensor(table[[2, 0, 3, 1]]))  # 4 rows = raw ids 2, 5, 7, 9


def raw_id_table(num_rows: int, first_id: int, dim: int = 600) -> np.ndarray:
    """A table in raw-id order whose row for raw id r holds r in its first column (and 1 in the second:
    no row is all zero)."""
    table = np.zeros((num_rows, dim), np.float32)
    table[:, 0], table[:, 1] = np.arange(first_id, first_id + num_rows), 1
    return table


@pytest.mark.parametrize("rows, first_id", [(33, 1), (34, 0)])  # ids 1-33, or one row per value 0-33
def test_a_raw_id_ordered_context_table_lands_each_row_on_its_class(tmp_path, rows, first_id):
    ds = data.Context33(make_context(tmp_path).parents[1], "train")
    np.save(tmp_path / "t.npy", raw_id_table(rows, first_id))
    emb = data.load_class_embeddings(tmp_path / "t.npy", ds.class_names, raw_ids=ds.raw_ids, order="raw")
    raw_id = {name: int(emb[ds.class_names.index(name), 0]) for name in ("aeroplane", "cat", "cow", "sofa", "sky",
                                                                       "ceiling", "person")}
    assert raw_id == {"aeroplane": 1, "cat": 8, "cow": 10, "sofa": 18, "sky": 21, "ceiling": 33, "person": 15}
    assert ds.class_names[-4:] == ["cat", "cow", "motorbike", "sofa"]  # unseen last: model order is not raw order


def test_a_raw_id_ordered_cocostuff_table_lands_each_row_on_its_class(tmp_path):
    ds = data.COCOStuff(make_coco(tmp_path).parent, "train")
    names = {"person": 0, "frisbee": 33, "bench": 14, "cow": 20, "river": 147, "wood": 181, "playingfield": 144}
    np.save(tmp_path / "values.npy", raw_id_table(182, 0))  # one row per PNG value 0-181, absent ids included
    emb = data.load_class_embeddings(tmp_path / "values.npy", ds.class_names, raw_ids=ds.raw_ids, order="raw")
    assert {n: int(emb[ds.class_names.index(n), 0]) for n in names} == names
    present = [r for r in range(182) if r not in data.COCO_STUFF_ABSENT]  # one row per class, ascending id
    np.save(tmp_path / "classes.npy", raw_id_table(182, 0)[present])  # 171 rows
    emb = data.load_class_embeddings(tmp_path / "classes.npy", ds.class_names, raw_ids=ds.raw_ids, order="raw")
    assert {n: int(emb[ds.class_names.index(n), 0]) for n in names} == names


def test_a_table_fitting_neither_order_is_refused_with_both_expected_shapes(tmp_path):
    ds = data.Context33(make_context(tmp_path).parents[1], "train")
    np.save(tmp_path / "t.npy", raw_id_table(59, 1))
    for order in ("raw", "model"):
        with pytest.raises(EmbeddingError, match=r"t\.npy: shape \(59, 600\).*raw-id order .* expects shape "
                           r"\(33, 600\) or \(34, 600\), model order .* \(33, 600\)"):
            data.load_class_embeddings(tmp_path / "t.npy", ds.class_names, raw_ids=ds.raw_ids, order=order)


def test_embeddings_with_the_wrong_dimension_are_refused_naming_the_file(tmp_path):
    np.save(tmp_path / "t.npy", np.zeros((20, 300), np.float32))
    with pytest.raises(EmbeddingError, match=r"t\.npy.*\(20, 300\).*\(20, 600\)"):
        data.load_class_embeddings(tmp_path / "t.npy", data.SHAPES_RAW, order="model")
    write_word2vec(tmp_path / "w.bin", VECTORS, newline=False)
    with pytest.raises(EmbeddingError, match=r"w\.bin.*3-d class embeddings, expected 600-d"):
        data.load_class_embeddings([tmp_path / "w.bin"], ["sky"])


def test_malformed_vector_files_raise_naming_the_file(tmp_path):
    (tmp_path / "bad.vec").write_text("2 3\nsky 1 2 3\nred 1 2\n")
    with pytest.raises(EmbeddingError, match=r"bad\.vec:3.*2 values, expected 3"):
        data.read_fasttext_vec(tmp_path / "bad.vec")
    write_word2vec(tmp_path / "w.bin", VECTORS, newline=False)
    (tmp_path / "cut.bin").write_bytes((tmp_path / "w.bin").read_bytes()[:-5])
    with pytest.raises(EmbeddingError, match=r"cut\.bin: truncated after 2 of 3"):
        data.read_word2vec_binary(tmp_path / "cut.bin")
    with pytest.raises(EmbeddingError, match="absent.bin does not exist"):
        data.load_class_embeddings([tmp_path / "absent.bin"], ["sky"])


def test_shapes_embeddings_follow_the_real_embedding_rule():
    names = ["red", "triangle", "red triangle", "sky"]
    table = data.shapes_embeddings(names, seed=3)
    assert table.shape == (4, 600)
    torch.testing.assert_close(table.norm(dim=1), torch.ones(4))
    # A one-word row is (v1 (+) v2) / sqrt(2) with unit v1, v2: recover each word's halves from it.
    red, tri = table[0] * math.sqrt(2), table[1] * math.sqrt(2)
    assert abs(float(red[:300].norm()) - 1) < 1e-5
    two_words = torch.cat([(red[:300] + tri[:300]) / 2, (red[300:] + tri[300:]) / 2])
    torch.testing.assert_close(table[2], two_words / two_words.norm())
    torch.testing.assert_close(data.shapes_embeddings(names[::-1], seed=3), table.flip(0))  # per word, not per list
    assert not torch.allclose(data.shapes_embeddings(names, seed=4), table)


# ------------------------------------------------------------------ shapes
@pytest.fixture(scope="module")
def shapes():
    return {"train": data.Shapes("train", num_images=300), "test": data.Shapes("test", num_images=150),
            "test128": data.Shapes("test", size=128, num_images=150)}


def test_shapes_class_order_and_attributes(shapes):
    ds = shapes["train"]
    assert ds.class_names == ["sky", "water", "grass", "sand", "red circle", "red square", "red cross",
                              "green circle", "green square", "green triangle", "blue square", "blue triangle",
                              "blue cross", "yellow circle", "yellow triangle", "yellow cross",
                              "red triangle", "green cross", "blue circle", "yellow square"]
    assert (ds.num_seen, ds.num_unseen, ds.ignore_index, len(ds)) == (16, 4, 255, 300)
    image, label = ds[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and label.dtype == torch.int64
    images = torch.stack([ds[i][0] for i in range(100)])  # (100, 3, 64, 64)
    assert (images.mean((0, 2, 3)).abs() < 0.2).all()  # zero-mean and unit-std per channel, roughly
    assert ((images.std((0, 2, 3)) - 1).abs() < 0.2).all()
    mean, std = torch.tensor(ds.mean).view(3, 1, 1), torch.tensor(ds.std).view(3, 1, 1)
    torch.testing.assert_close(image, (ds.images[0] / 255 - mean) / std)


def test_shapes_same_seed_gives_identical_data_and_other_seeds_or_splits_differ(shapes):
    again = data.Shapes("train", num_images=300)
    assert torch.equal(again.images, shapes["train"].images) and torch.equal(again.labels, shapes["train"].labels)
    fewer = data.Shapes("train", num_images=37)  # the first scenes do not depend on how many are drawn
    assert torch.equal(fewer.images, again.images[:37]) and torch.equal(fewer.labels, again.labels[:37])
    assert not torch.equal(data.Shapes("train", num_images=300, seed=1).labels, again.labels)
    assert not np.array_equal(data.Shapes("test", num_images=300, size=8).scenes["centre"], again.scenes["centre"])


@pytest.mark.parametrize("key", ["train", "test", "test128"])
def test_shapes_sky_lies_above_the_horizon_and_water_grass_or_sand_below(shapes, key):
    ds = shapes[key]
    rows = torch.arange(ds.size).view(1, -1, 1) + 0.5
    above = rows < torch.as_tensor(ds.scenes["horizon"]).view(-1, 1, 1) * ds.size  # (N, S, 1)
    labels = ds.labels.long()
    assert not ((labels == 0) & ~above).any() and not ((labels >= 1) & (labels <= 3) & above).any()
    bottom = torch.as_tensor(ds.scenes["bottom"]).view(-1, 1, 1)  # raw ids 1-3 are model ids 1-3 too
    assert not (((labels >= 1) & (labels <= 3)) & (labels != bottom)).any()
    assert all((labels[i] == 0).any() and (labels[i] == bottom[i]).any() for i in range(len(ds)))


def test_shapes_sky_and_water_pixels_come_from_the_same_colour_distribution(shapes):
    ds = shapes["test"]
    lab = ds.labels.long()
    interior = torch.ones_like(lab, dtype=torch.bool)  # 8 neighbours share the label: the blur mixes in nothing
    padded = torch.nn.functional.pad(lab, (1, 1, 1, 1), value=-1)
    for dy in range(3):
        for dx in range(3):
            interior &= padded[:, dy:dy + ds.size, dx:dx + ds.size] == lab
    water_images = [i for i in range(len(ds)) if ds.scenes["bottom"][i] == 1]
    assert len(water_images) > 20
    for i in water_images:
        img = ds.images[i].float() / 255  # (3, S, S)
        sky, water = img[:, interior[i] & (lab[i] == 0)], img[:, interior[i] & (lab[i] == 1)]
        assert (sky.mean(1) - water.mean(1)).abs().max() < 0.02
        assert ((sky.std(1) / water.std(1)) - 1).abs().max() < 0.3
    grass = [i for i in range(len(ds)) if ds.scenes["bottom"][i] == 2][0]
    img = ds.images[grass].float() / 255
    gap = img[:, interior[grass] & (lab[grass] == 0)].mean(1) - img[:, interior[grass] & (lab[grass] == 2)].mean(1)
    assert gap.abs().max() > 0.1  # the check can see a different stuff colour


def test_shapes_unseen_things_occur_in_training_images_only_as_ignore(shapes):
    ds = shapes["train"]
    assert ds.labels[ds.labels != 255].max() < ds.num_seen
    raw = data._render_shapes(ds.scenes, 64, 64, 0.0, torch.Generator())[1].long()  # raw ids 0-19, 255 void
    unseen_raw = torch.tensor([data.SHAPES_RAW.index(n) for n in data.SHAPES_UNSEEN])
    is_unseen = torch.isin(raw, unseen_raw)
    assert is_unseen.sum() > 1000  # unseen things are drawn in training images...
    assert (ds.labels[is_unseen] == 255).all()  # ...and labelled ignore
    seen = (raw != 255) & ~is_unseen
    names = [data.SHAPES_RAW[r] for r in raw[seen].tolist()[:500]]
    assert [ds.class_names[c] for c in ds.labels[seen].tolist()[:500]] == names
    assert ds.images[is_unseen[:, None].expand_as(ds.images)].float().std() > 30  # the pixels stay drawn
    test_labels = shapes["test"].labels
    assert all((test_labels == c).any() for c in range(16, 20))  # the test split keeps unseen classes


def test_shapes_double_size_test_shows_the_same_scenes_with_things_at_the_same_pixel_size(shapes):
    small, big = shapes["test"], shapes["test128"]
    for k in small.scenes:
        np.testing.assert_array_equal(small.scenes[k], big.scenes[k])
    c = small.scenes["centre"][:, 0]
    lone = [i for i in range(len(small))
            if small.scenes["count"][i] == 1 and (0.25 < c[i]).all() and (c[i] < 0.75).all()]
    assert len(lone) >= 10
    for i in lone:
        thing = small.class_names.index(data.SHAPES_RAW[4 + small.scenes["thing"][i, 0]])
        ratio = (big.labels[i] == thing).sum() / (small.labels[i] == thing).sum()
        assert 0.8 < ratio < 1.25  # the thing keeps its area in pixels...
        sky_rows = (big.labels[i] == 0).any(1).sum() / (small.labels[i] == 0).any(1).sum()
        assert 1.9 < sky_rows < 2.1  # ...while the stuff bands scale with the image


def test_shapes_context_layout_puts_circles_and_crosses_above_the_horizon_and_the_others_below_with_p_0_8():
    scenes = data._shapes_scenes(4000, 0, "train", "context")  # 12,000 things
    form, colour = scenes["thing"] % 4, scenes["thing"] // 4
    y, h, r = scenes["centre"][..., 0], scenes["horizon"][:, None], scenes["radius"]
    above = y < h
    for f, name in enumerate(data.SHAPES_FORMS):
        own = 0.8 if name in ("circle", "cross") else 0.2  # share above the horizon
        assert abs(above[form == f].mean() - own) < 0.03  # ~3,000 things: binomial std 0.007
        for c in range(4):  # colour says nothing about place
            assert abs(above[(form == f) & (colour == c)].mean() - own) < 0.05  # ~750 things: std 0.015
    assert ((y + r <= h) | (y - r >= h)).all() and ((0.1 <= y) & (y <= 0.9)).all()  # clear of the horizon
    # Uniform within the band: the relative height in it falls into each quarter a quarter of the time.
    t = np.where(above, (y - 0.1) / (h - r - 0.1), (y - h - r) / (0.9 - h - r))
    np.testing.assert_allclose(np.histogram(t, bins=4, range=(0, 1))[0] / t.size, 0.25, atol=0.02)
    uniform = data._shapes_scenes(4000, 0, "train", "uniform")
    assert abs((uniform["centre"][..., 0] < h)[form == 0].mean() - 0.5) < 0.05  # uniform: no preference
    for k in scenes:  # the layout moves the centre heights, nothing else
        np.testing.assert_array_equal(scenes[k][..., 1] if k == "centre" else scenes[k],
                                      uniform[k][..., 1] if k == "centre" else uniform[k])


def test_shapes_context_layout_is_what_the_rendered_labels_show():
    ds = data.Shapes("test", num_images=400)  # the default layout
    assert ds.layout == "context"
    rows = torch.arange(64).view(-1, 1) + 0.5
    sides = {True: 0, False: 0}
    for i in np.flatnonzero(ds.scenes["count"] == 1):
        thing = ds.class_names.index(data.SHAPES_RAW[4 + ds.scenes["thing"][i, 0]])
        pixel_rows = rows.expand(64, 64)[ds.labels[i] == thing]
        above = pixel_rows < ds.scenes["horizon"][i] * 64
        assert above.all() or not above.any()  # one side of the horizon, never across it
        sides[bool(above.all()) == (ds.scenes["thing"][i, 0] % 4 in data.SHAPES_FLY)] += 1
    assert sides[True] > 2.5 * sides[False] > 0  # mostly in its own band, sometimes in the other


def test_shapes_uniform_layout_draws_the_first_version_of_the_benchmark_bit_for_bit():
    import hashlib
    ds = data.Shapes("train", num_images=64, layout="uniform")
    test = data.Shapes("test", size=128, num_images=16, layout="uniform")
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in (ds.images, ds.labels, test.images, test.labels)))
    assert digest.hexdigest()[:16] == UNIFORM_DIGEST


UNIFORM_DIGEST = "88b141b14dc93809"  # sha256 of the images and labels the benchmark's first version rendered


@pytest.mark.parametrize("key", ["train", "test", "test128"])
def test_shapes_every_object_has_a_one_pixel_void_ring(shapes, key):
    ds = shapes[key]
    lab = ds.labels.long()
    N, S, _ = lab.shape
    assert all((lab[i] == 255).any() for i in range(N))
    padded = torch.nn.functional.pad(lab, (1, 1, 1, 1), value=255)
    for dy in range(3):
        for dx in range(3):
            other = padded[:, dy:dy + S, dx:dx + S]
            # Two different labelled classes never touch, except stuff meeting stuff at the horizon.
            touching = (lab != 255) & (other != 255) & (other != lab)
            assert not (touching & ((lab >= 4) | (other >= 4))).any()
    # With a single labelled thing, void is exactly the ring of pixels 8-adjacent to it.
    things = (lab >= 4) & (lab != 255)
    lone = [i for i in range(N) if ds.scenes["count"][i] == 1 and things[i].any()]
    assert len(lone) >= 10
    for i in lone:
        thing = things[i].float()[None, None]
        ring = (torch.nn.functional.max_pool2d(thing, 3, 1, 1) - thing)[0, 0].bool()
        assert torch.equal(lab[i] == 255, ring)


def test_shapes_batches_fetched_at_once_equal_the_items_one_by_one(shapes):
    ds = shapes["train"]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=[[5, 0, 299, 17]])
    x, y = next(iter(loader))
    assert torch.equal(x, torch.stack([ds[i][0] for i in (5, 0, 299, 17)]))  # bit for bit
    assert torch.equal(y, torch.stack([ds[i][1] for i in (5, 0, 299, 17)])) and y.dtype == torch.int64


def test_shapes_default_sets_have_2000_and_300_images_and_render_in_seconds():
    import time
    start = time.perf_counter()
    assert (len(data.Shapes("train")), len(data.Shapes("test"))) == (2000, 300)
    assert time.perf_counter() - start < 20  # about 1 s on one free core


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("cls, layout", [(data.VOC, "SegmentationClassAug"),
                                         (data.Context33, "SegmentationClassContext"),
                                         (data.COCOStuff, "stuffthingmaps")])
def test_missing_root_shows_the_expected_layout_and_the_readme_section(tmp_path, cls, layout):
    with pytest.raises(DatasetError) as e:
        cls(tmp_path / "nowhere", "train")
    assert layout in str(e.value) and "README section 'Datasets'" in str(e.value) and "nowhere" in str(e.value)


def test_list_naming_a_missing_image_or_label_is_refused_naming_it(tmp_path):
    top = make_voc(tmp_path)
    (top / "ImageSets/Segmentation/val.txt").write_text("a\nb\nghost\n")
    with pytest.raises(DatasetError, match=r"(?s)2 file\(s\) named by val.txt.*ghost\.jpg"):
        data.VOC(tmp_path, "val")
    (top / "SegmentationClassAug" / "a.png").unlink()
    with pytest.raises(DatasetError, match=r"SegmentationClassAug/a\.png"):
        data.VOC(tmp_path, "train")
    (top / "ImageSets/Segmentation/train_aug.txt").unlink()
    with pytest.raises(DatasetError, match=r"missing list file .*train_aug\.txt"):
        data.VOC(tmp_path, "train")


def test_image_and_label_of_different_sizes_are_refused_naming_both(tmp_path):
    top = make_coco(tmp_path)
    write_jpeg(top / "images/val2017/000000000009.jpg", 8, 6)
    with pytest.raises(DatasetError, match=r"000000000009\.jpg is \(8, 6\).*000000000009\.png is \(6, 8\)"):
        data.COCOStuff(tmp_path, "test")[0]


@pytest.mark.parametrize("make, cls, bad", [(make_voc, data.VOC, 21), (make_context, data.Context33, 60),
                                            (make_coco, data.COCOStuff, 200)])
def test_invalid_raw_label_values_are_refused_naming_file_and_values(tmp_path, make, cls, bad):
    make(tmp_path)
    label_path = cls(tmp_path, "test").pairs[0][1]
    write_label(label_path, tile([[0, bad, bad + 1, 1], [1, 1, 1, 1]]))
    with pytest.raises(DatasetError, match=rf"{label_path.name} holds invalid values \[{bad}, {bad + 1}\]"):
        cls(tmp_path, "test")[0]


def test_corrupt_images_and_colour_labels_are_refused_naming_the_file(tmp_path):
    top = make_voc(tmp_path)
    (top / "JPEGImages" / "a.jpg").write_bytes(b"not a jpeg at all")
    ds = data.VOC(tmp_path, "val")
    with pytest.raises(DatasetError, match=r"cannot read .*a\.jpg"):
        ds[0]
    Image.new("RGB", (8, 6)).save(ds.pairs[1][1])
    with pytest.raises(DatasetError, match=r"b\.png has mode RGB"):
        ds[1]


def test_invalid_arguments_raise_value_error():
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        data.Shapes("validation")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.build_dataset("imagenet", "train")
    with pytest.raises(ValueError, match="needs a root"):
        data.build_dataset("voc", "train")


# ------------------------------------------------------------------ CLI
def test_cli_reports_a_missing_dataset_without_a_traceback(tmp_path, capsys):
    assert data.main(["--dataset", "voc", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("data.py: error: VOC: no dataset found") and "Traceback" not in err


def test_cli_preview_writes_a_small_png(tmp_path, capsys):
    out = tmp_path / "p.png"
    assert data.main(["--preview", str(out), "--num-samples", "4"]) == 0
    assert "16 seen classes" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.size == (2 * (2 * 64 + 4), 2 * (64 + 4))
    assert out.stat().st_size < 100_000


def test_unseen_images_drop_keeps_exactly_the_training_images_without_an_unseen_pixel(tmp_path):
    """--unseen-images: ``ignore`` keeps every image, its unseen pixels 255; ``drop`` (paper section 3.1)
    removes each image holding an unseen pixel, on shapes and on a real layout."""
    kept = data.Shapes("train", num_images=64)
    assert kept.choose_images("ignore") == {"ignore": 64, "drop": 64 - int(kept.holds_unseen().sum())}
    assert len(kept) == 64 and 0 < kept.holds_unseen().sum() < 64
    dropped = data.Shapes("train", num_images=64)
    dropped.choose_images("drop")
    assert torch.equal(dropped.images, kept.images[~kept.holds_unseen()]) and not dropped.holds_unseen().any()
    top = make_voc(tmp_path)
    write_jpeg(top / "JPEGImages" / "c.jpg", 6, 8)
    write_label(top / "SegmentationClassAug" / "c.png", tile([[0, 1, 2, 3], [4, 5, 255, 14]]))  # seen only
    (top / "ImageSets/Segmentation/train_aug.txt").write_text("a\nb\nc\n")
    voc = data.VOC(tmp_path, "train")
    assert voc.choose_images("drop") == {"ignore": 3, "drop": 1} and [p.stem for p, _ in voc.pairs] == ["c"]
    with pytest.raises(ValueError, match="--unseen-images"):
        data.VOC(tmp_path, "test").choose_images("drop")

import numpy as np
import pytest
import torch

import slimkit.data as data


def test_mnist10k_is_real_and_split(mnist):
    train, test = mnist
    assert (len(train), len(test)) == (8000, 2000)
    assert train.input_shape == (1, 28, 28)
    assert train.num_classes == 10 and set(test.labels.tolist()) == set(range(10))
    assert abs(train.images.mean().item()) < 0.05  # normalized with MNIST's own mean/std
    # deterministic: loading twice gives identical tensors
    again, _ = data.load("mnist10k")
    assert torch.equal(again.images, train.images)


def test_digits_split_is_seeded():
    a_train, a_test = data.load("digits", seed=1)
    b_train, _ = data.load("digits", seed=1)
    c_train, _ = data.load("digits", seed=2)
    assert len(a_train) + len(a_test) == 1797 and a_train.input_shape == (1, 8, 8)
    assert torch.equal(a_train.labels, b_train.labels)
    assert not torch.equal(a_train.labels, c_train.labels)


def test_mnist_as_cifar_shape():
    train, test = data.load("mnist10k", shape=(3, 32, 32))
    assert train.images.shape == (8000, 3, 32, 32) and test.input_shape == (3, 32, 32)
    assert torch.equal(train.images[:, 0], train.images[:, 2])


def test_npz_spec(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(path, x=rng.integers(0, 255, (50, 12, 12), dtype=np.uint8), y=rng.integers(0, 3, 50))
    train, test = data.load(f"npz:{path}")
    assert len(train) == 40 and len(test) == 10 and train.input_shape == (1, 12, 12)
    assert train.images.max() <= 1.0
    nhwc = tmp_path / "nhwc.npz"
    np.savez(
        nhwc,
        x_train=np.zeros((4, 8, 8, 3), np.float32),
        y_train=np.arange(4),
        x_test=np.zeros((2, 8, 8, 3), np.float32),
        y_test=np.arange(2),
    )
    train, test = data.load(f"npz:{nhwc}")
    assert train.input_shape == (3, 8, 8) and len(test) == 2


def test_bad_specs_list_what_exists(tmp_path):
    with pytest.raises(data.DataError, match="did you mean 'mnist10k'"):
        data.load("mnist10")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        data.load(f"npz:{tmp_path / 'nope.npz'}")
    bad = tmp_path / "bad.npz"
    np.savez(bad, a=np.zeros(3))
    with pytest.raises(ValueError, match="expected arrays"):
        data.load(f"npz:{bad}")
    with pytest.raises(data.DataError, match="CxHxW"):
        data.parse_shape("32x32")


def test_offline_torchvision_error_says_what_to_do(tmp_path):
    with pytest.raises(data.DataError, match="mnist10k"):
        data.load("cifar10", root=tmp_path, download=False)


def test_folder_spec(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / split / cls / f"{i}.png")
    train, test = data.load(f"folder:{tmp_path}")
    image, label = train[0]
    assert len(train) == 6 and len(test) == 6 and tuple(image.shape) == (3, 8, 8) and label in (0, 1)


def test_split_holds_out_a_seeded_fraction(mnist):
    train, _ = mnist
    rest, val = data.split(train, 0.125, seed=3)
    assert (len(rest), len(val)) == (7000, 1000)
    again, _ = data.split(train, 0.125, seed=3)
    assert torch.equal(again.labels, rest.labels)
    # disjoint: every image appears once across the two parts
    assert len(torch.unique(torch.cat([rest.images, val.images]).flatten(1), dim=0)) == len(
        torch.unique(train.images.flatten(1), dim=0)
    )
    with pytest.raises(ValueError, match="fraction=1"):
        data.split(train, 1)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from ()

    with pytest.raises(ValueError, match="split needs a dataset with a length.*got Stream"):
        data.split(Stream(), 0.5)


def test_npz_with_half_a_test_split_splits_the_training_arrays(tmp_path):
    """x_test without y_test (or the reverse) is ignored: the training arrays are split 80/20 instead."""
    path = tmp_path / "half.npz"
    np.savez(
        path,
        x_train=np.zeros((10, 4, 4), np.float32),
        y_train=np.arange(10) % 2,
        x_test=np.zeros((3, 4, 4), np.float32),
    )
    train, test = data.load(f"npz:{path}")
    assert (len(train), len(test)) == (8, 2)


def save_npz(path, **arrays):
    np.savez(path, **arrays)
    return f"npz:{path}"


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        ({"x": np.zeros((6, 4, 4)), "y": np.array([0, 1, 2, -1, 0, 1])}, r"bad.npz y: row 3: label -1 is not a class"),
        (
            {"x": np.zeros((6, 4, 4)), "y": np.array([0, 1, 1.5, 0, 1, 0])},
            r"bad.npz y: row 2: label 1.5 is not an integer",
        ),
        ({"x": np.zeros((6, 4, 4)), "y": np.array([0, 1, np.nan, 0, 1, 0])}, r"bad.npz y: row 2: label nan"),
        ({"x": np.zeros((6, 4, 4)), "y": np.array(list("abcabc"))}, r"bad.npz y: labels must be integer class indices"),
        ({"x": np.zeros((6, 4, 4)), "y": np.eye(6)}, r"bad.npz y: labels must be one class index per image"),
        (
            {
                "x_train": np.zeros((4, 4, 4)),
                "y_train": np.array([0, 1, 2, 0]),
                "x_test": np.zeros((3, 4, 4)),
                "y_test": np.array([0, 3, 1]),
            },
            r"bad.npz y_test: row 1: label 3 .* in \[0, 3\)",
        ),
        (
            {"x": np.where(np.arange(6)[:, None, None] == 4, np.inf, np.zeros((6, 4, 4))), "y": np.zeros(6, dtype=int)},
            r"bad.npz x: row 4: the image holds NaN or infinity",
        ),
        ({"x": np.zeros((6, 4, 4)), "y": np.zeros(5, dtype=int)}, r"bad.npz: 6 images but 5 labels"),
    ],
)
def test_npz_labels_and_images_are_checked_naming_the_row(tmp_path, arrays, expected):
    spec = save_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(data.DataError, match=expected) as info:
        data.load(spec)
    assert "\n" not in str(info.value)


def test_npz_that_is_not_an_archive_of_plain_arrays(tmp_path):
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(data.DataError, match="a single array, not an .npz archive"):
        data.load(f"npz:{tmp_path / 'one.npz'}")
    spec = save_npz(tmp_path / "obj.npz", x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4, dtype=int))
    with pytest.raises(data.DataError, match="array 'x' cannot be read"):
        data.load(spec)


def test_npz_labels_as_a_column_and_float_integers_are_fine(tmp_path):
    spec = save_npz(tmp_path / "ok.npz", x=np.zeros((10, 4, 4), np.float32), y=np.arange(10.0).reshape(10, 1) % 3)
    train, test = data.load(spec)
    assert train.labels.dtype == torch.int64 and train.labels.ndim == 1
    assert sorted(torch.cat([train.labels, test.labels]).tolist()) == sorted((np.arange(10) % 3).tolist())


def make_tree(root, classes=("cat", "dog")):
    from PIL import Image

    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / cls / f"{i}.png")


def test_folder_corrupt_image_names_the_file(tmp_path):
    make_tree(tmp_path)
    broken = tmp_path / "dog" / "broken.png"
    broken.write_bytes((tmp_path / "dog" / "0.png").read_bytes()[:40])  # a PNG header, then nothing
    train, test = data.load(f"folder:{tmp_path}")
    both = torch.utils.data.ConcatDataset([train, test])
    with pytest.raises(data.DataError, match=r"broken.png: not a readable image") as info:
        for i in range(len(both)):
            both[i]
    assert "\n" not in str(info.value)


def test_folder_test_classes_follow_the_training_indices(tmp_path):
    make_tree(tmp_path / "train", ("ant", "bee", "cat"))
    make_tree(tmp_path / "test", ("ant", "cat"))
    train, test = data.load(f"folder:{tmp_path}")
    assert sorted({label for _, label in test}) == [0, 2] and test.classes == train.classes
    make_tree(tmp_path / "val2" / "train", ("ant",))
    make_tree(tmp_path / "val2" / "val", ("ant", "owl"))
    with pytest.raises(data.DataError, match="owl: class 'owl' has no folder in the training tree"):
        data.load(f"folder:{tmp_path / 'val2'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="not an image tree of one folder per class"):
        data.load(f"folder:{tmp_path / 'empty'}")

"""Few-shot data path: listing, sampling, preprocessing, decoding, fingerprints, demo photos."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from dcvit_deploy.model.images import (
    IMAGE_EXTENSIONS,
    DataOverrides,
    DataWarning,
    FewShotImages,
    ImageList,
    build_transforms,
    holdout_note,
    input_fingerprint,
    list_images,
    load_eval_tensor,
    resolve_data_config,
    sample_images,
    sampling_note,
    skipped_summary,
    split_holdout,
    write_demo_images,
)

from dcvit_deploy.errors import DataError, EnvironmentProblem, UserInputError


def _touch_tree(root: Path, names: list[str]) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def _solid_png(path: Path, size: tuple[int, int], rgb: tuple[int, int, int]) -> Path:
    from PIL import Image

    Image.new("RGB", size, rgb).save(path)
    return path


@pytest.fixture
def mixed_dir(photo_dir: Path, tmp_path: Path) -> Path:
    """photo_dir's 6 real photos plus one garbage .jpg and one truncated .png."""
    root = tmp_path / "mixed"
    shutil.copytree(photo_dir, root)
    (root / "garbage.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    whole = (root / "astronaut.png").read_bytes()
    (root / "sub" / "truncated.png").write_bytes(whole[: len(whole) // 3])
    return root


# --------------------------------------------------------------------------- listing


def test_list_images_recursive_sorted_and_filtered(tmp_path: Path) -> None:
    _touch_tree(
        tmp_path,
        [
            "b.png", "a.JPG", "c.jpeg", "notes.txt", "model.onnx", ".hidden.png",
            "cls_b/x.WebP", "cls_a/y.tiff", "cls_a/z.tif", "cls_a/deep/w.bmp",
            "cls_a/p.ppm", "cls_a/q.pgm", ".git/ignored.png",
        ],
    )  # fmt: skip
    images = list_images(tmp_path)
    assert isinstance(images, ImageList)
    assert images.relative() == (
        "a.JPG", "b.png", "c.jpeg", "cls_a/deep/w.bmp", "cls_a/p.ppm", "cls_a/q.pgm",
        "cls_a/y.tiff", "cls_a/z.tif", "cls_b/x.WebP",
    )  # fmt: skip
    assert all(p.is_absolute() and p.is_file() for p in images)
    assert list_images(tmp_path).paths == images.paths  # deterministic


def test_list_images_real_photos_flat_and_subfolder(photo_dir: Path) -> None:
    images = list_images(photo_dir)
    assert len(images) == 6
    assert sum(1 for r in images.relative() if r.startswith("sub/")) == 3


def test_missing_folder_error(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        list_images(tmp_path / "nope")
    text = str(err.value)
    assert "does not exist" in text and "nope" in text and "; fix: " in text
    assert "\n" not in text


def test_file_instead_of_folder_error(tmp_path: Path) -> None:
    f = _solid_png(tmp_path / "one.png", (8, 8), (1, 2, 3))
    with pytest.raises(DataError) as err:
        list_images(f)
    text = str(err.value)
    assert "is a file, not a folder" in text and "fix: pass the folder" in text
    assert str(tmp_path) in text


def test_empty_folder_error_names_extensions(tmp_path: Path) -> None:
    _touch_tree(tmp_path, ["readme.txt", "sub/data.csv"])
    with pytest.raises(DataError) as err:
        list_images(tmp_path)
    text = str(err.value)
    assert "no images found" in text
    assert all(ext in text for ext in IMAGE_EXTENSIONS)
    assert "\n" not in text


# --------------------------------------------------------------------------- sampling


def test_sampling_seeded_deterministic_and_seed_sensitive() -> None:
    paths = [Path(f"/data/img_{i:03d}.png") for i in range(100)]
    a = sample_images(paths, 10, seed=0)
    assert a == sample_images(paths, 10, seed=0)
    assert len(a) == 10 == len(set(a))
    assert a == sorted(a, key=paths.index)  # input order kept
    assert sample_images(paths, 10, seed=1) != a
    assert sample_images(paths, None, seed=0) == paths


def test_sampling_more_than_available_warns_and_uses_all() -> None:
    paths = [Path(f"/data/{i}.png") for i in range(5)]
    with pytest.warns(DataWarning, match="asked for 9 few-shot images but only 5"):
        got = sample_images(paths, 9, seed=0)
    assert got == paths
    assert sampling_note(5, 9) is not None and sampling_note(5, 5) is None


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_sampling_rejects_bad_counts(bad: object) -> None:
    with pytest.raises(UserInputError, match="positive integer"):
        sample_images([Path("a.png")], bad, seed=0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- decoding


def test_corrupt_files_skipped_and_counted(mixed_dir: Path) -> None:
    images = list_images(mixed_dir)
    assert len(images) == 8
    ds = FewShotImages(images)
    assert len(ds) == 6
    skipped = {p.name: reason for p, reason in ds.skipped}
    assert set(skipped) == {"garbage.jpg", "truncated.png"}
    assert all(reason for reason in skipped.values())
    assert ds[0].mode == "RGB"  # transform=None returns the decoded PIL image


def test_16_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    """A 16-bit grayscale PNG (PIL mode I;16) used to be clipped by ``convert("RGB")``: 90% of
    the pixels of a full-range gradient became 255. Now values are scaled by 255/65535."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    rgb = np.asarray(FewShotImages([tmp_path / "deep.png"])[0])
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    assert (rgb == 255).mean() < 0.01
    expected = np.rint(ramp.astype(np.float64) * 255 / 65535)
    assert np.abs(rgb[..., 0].astype(np.float64) - expected).max() <= 1
    assert abs(float(rgb.mean()) - 127.5) < 1.0


def test_32_bit_integer_and_float_images(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    small = (np.arange(64, dtype=np.int32).reshape(8, 8) * 4).astype(np.int32)  # 0..252
    Image.fromarray(small, mode="I").save(tmp_path / "small.tif")
    wide = np.full((8, 8), 70000, dtype=np.int32)
    Image.fromarray(wide, mode="I").save(tmp_path / "wide.tif")
    Image.fromarray(np.ones((8, 8), dtype=np.float32), mode="F").save(tmp_path / "float.tif")
    ds = FewShotImages(list_images(tmp_path))
    assert [p.name for p in ds.paths] == ["small.tif"]
    assert np.array_equal(np.asarray(ds[0])[..., 0], small.astype(np.uint8))  # 8-bit values kept
    reasons = {p.name: r for p, r in ds.skipped}
    assert "outside the 16-bit range" in reasons["wide.tif"]
    assert "mode F" in reasons["float.tif"]


def test_skipped_summary_is_one_line(mixed_dir: Path) -> None:
    ds = FewShotImages(list_images(mixed_dir))
    line = skipped_summary(ds.skipped, 8)
    assert line.startswith("2 of 8 images could not be used") and "garbage.jpg" in line
    assert "\n" not in line and skipped_summary([], 8) == ""
    many = [(Path(f"{i}.png"), "broken") for i in range(5)]
    assert skipped_summary(many, 9).endswith("and 2 more)")


def test_holdout_split_and_its_note() -> None:
    paths = [Path(f"{i}.png") for i in range(6)]
    train = sample_images(paths, 4, seed=0)
    split = split_holdout(paths, train, 2, seed=0)
    assert len(split.paths) == 2 and not set(split.paths) & set(train) and split.note == ""
    short = split_holdout(paths, train, 1000, seed=0)
    assert "--holdout 1000" in short.note and "using 2" in short.note
    assert short.note == holdout_note(6, 4, 1000)
    none_left = split_holdout(paths, paths, 2, seed=0)
    assert none_left.paths == tuple(paths) and "no images left over" in none_left.note
    assert none_left.note == holdout_note(6, 6, 2) == holdout_note(6, None, 2)
    assert holdout_note(6, 4, 2) == ""
    with pytest.raises(UserInputError, match="--holdout"):
        split_holdout(paths, train, 0, seed=0)


def test_nothing_decodable_raises(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="none of the 1 images could be decoded"):
        FewShotImages(list_images(tmp_path))


def test_load_eval_tensor_skips_and_is_deterministic(mixed_dir: Path, tiny_vit) -> None:
    cfg = resolve_data_config(tiny_vit)
    paths = list_images(mixed_dir).paths
    full = load_eval_tensor(paths, cfg)
    assert tuple(full.shape) == (6, 3, 32, 32)
    again = load_eval_tensor(paths, cfg, max_images=4)
    assert tuple(again.shape) == (4, 3, 32, 32)
    assert bool((again == full[:4]).all())


# --------------------------------------------------------------------------- preprocessing


def test_default_config_is_the_models_own(tiny_vit) -> None:
    import timm.data

    cfg = resolve_data_config(tiny_vit)
    ref = timm.data.resolve_data_config({}, model=tiny_vit)
    # timm's pretrained_cfg still says 224; the model was built for (and only accepts) 32.
    assert ref["input_size"] == (3, 224, 224)
    assert cfg["input_size"] == (3, 32, 32)
    assert cfg["mean"] == tuple(ref["mean"]) and cfg["std"] == tuple(ref["std"])
    assert cfg["interpolation"] == ref["interpolation"]
    assert cfg["crop_pct"] == ref["crop_pct"]


def test_transforms_produce_model_input_size(photo_dir: Path, tiny_vit) -> None:
    cfg = resolve_data_config(tiny_vit)
    train_tf = build_transforms(cfg, train=True)
    eval_tf = build_transforms(cfg, train=False)
    text = repr(train_tf)
    assert "RandAugment" in text and "RandomErasing" not in text
    assert "RandAugment" not in repr(eval_tf)
    ds = FewShotImages(list_images(photo_dir), train_tf)
    assert tuple(ds[0].shape) == (3, 32, 32)
    eval_ds = FewShotImages(list_images(photo_dir), eval_tf)
    assert tuple(eval_ds[1].shape) == (3, 32, 32)
    assert bool((eval_ds[1] == eval_ds[1]).all())
    assert tiny_vit(eval_ds[1][None]).shape == (1, 10)
    from torch.utils.data import DataLoader

    batch = next(iter(DataLoader(eval_ds, batch_size=4)))
    assert tuple(batch.shape) == (4, 3, 32, 32)


def test_overrides_size_and_normalisation_respected(tmp_path: Path, tiny_vit) -> None:
    ov = DataOverrides(img_size=48, mean=(0.5,), std=(0.25, 0.5, 1.0), crop_pct=1.0)
    cfg = resolve_data_config(tiny_vit, ov)
    assert cfg["input_size"] == (3, 48, 48)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.25, 0.5, 1.0)
    img_path = _solid_png(tmp_path / "solid.png", (60, 60), (255, 0, 51))
    from PIL import Image

    for train in (True, False):
        out = build_transforms(cfg, train=train)(Image.open(img_path).convert("RGB"))
        assert tuple(out.shape) == (3, 48, 48)
    out = build_transforms(cfg, train=False)(Image.open(img_path).convert("RGB"))
    expected = [(1.0 - 0.5) / 0.25, (0.0 - 0.5) / 0.5, (0.2 - 0.5) / 1.0]
    for channel, value in enumerate(expected):
        assert out[channel].flatten().sub(value).abs().max().item() < 1e-5


def test_overrides_interpolation_crop(tiny_vit) -> None:
    cfg = resolve_data_config(
        tiny_vit,
        DataOverrides(input_size=(3, 40, 24), interpolation="bilinear", crop_mode="squash"),
    )
    assert cfg["input_size"] == (3, 40, 24)
    assert cfg["interpolation"] == "bilinear" and cfg["crop_mode"] == "squash"
    assert "bilinear" in repr(build_transforms(cfg, train=False))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"img_size": 32, "input_size": (3, 32, 32)}, "both given"),
        ({"img_size": 0}, "img_size must be a positive integer"),
        ({"input_size": (3, 32)}, "input_size must be three"),
        ({"std": (0.0,)}, "std values must be > 0"),
        ({"mean": (float("nan"),)}, "finite"),
        ({"interpolation": "cubicle"}, "unknown interpolation"),
        ({"crop_pct": 1.5}, r"crop_pct must be in \(0, 1\]"),
        ({"crop_mode": "zoom"}, "unknown crop_mode"),
    ],
)
def test_overrides_validated(kwargs: dict, match: str) -> None:
    with pytest.raises(UserInputError, match=match):
        DataOverrides(**kwargs)


def test_mean_length_must_match_channels(tiny_vit) -> None:
    with pytest.raises(UserInputError, match="mean has 2 values but the input has 3 channels"):
        resolve_data_config(tiny_vit, DataOverrides(mean=(0.1, 0.2)))


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_tracks_content_names_and_not_location(photo_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(photo_dir, root)
    images = list_images(root)
    base = input_fingerprint(images)
    assert base == input_fingerprint(list_images(photo_dir))  # location-independent
    assert base == input_fingerprint(reversed(list(images.paths)))  # order-independent
    assert len(base) == 64

    victim = root / "coffee.png"
    data = bytearray(victim.read_bytes())
    data[-20] ^= 0xFF  # same size, different content
    victim.write_bytes(bytes(data))
    changed = input_fingerprint(list_images(root))
    assert changed != base

    victim.rename(root / "sub" / "coffee.png")
    assert input_fingerprint(list_images(root)) not in (base, changed)


# --------------------------------------------------------------------------- demo images


def test_demo_images_written_deterministic_and_decodable(tmp_path: Path) -> None:
    first = write_demo_images(tmp_path / "a", count=16, seed=3)
    assert len(first) == 16 and all(p.suffix == ".jpg" for p in first)
    assert list_images(tmp_path / "a").paths == tuple(p.resolve() for p in first)
    ds = FewShotImages(first)
    assert len(ds) == 16 and not ds.skipped
    assert any("astronaut" in p.name for p in first)
    second = write_demo_images(tmp_path / "b", count=16, seed=3)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    other = write_demo_images(tmp_path / "c", count=16, seed=4)
    assert [p.read_bytes() for p in first] != [p.read_bytes() for p in other]


def test_demo_images_without_scikit_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "skimage", None)  # makes `import skimage` fail
    with pytest.raises(EnvironmentProblem, match=r"pip install dcvit-deploy\[demo\]"):
        write_demo_images(tmp_path, count=2)


def test_paper_randaugment_survives_extreme_posterize() -> None:
    """The paper's policy ``rand-m9-mstd0.5-inc1`` can draw posterize with 0 bits kept (magnitude
    noise clipped at 10); the installed Pillow must accept it or finetuning crashes at random."""
    import random

    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform

    aug = rand_augment_transform("rand-m9-mstd0.5-inc1", {})
    posterize = next(op for op in aug.ops if op.name == "PosterizeIncreasing")
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10, 0
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    random.seed(0)
    out = posterize(img)
    assert out.size == (8, 8)

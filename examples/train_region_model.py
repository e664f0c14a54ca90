"""Train the shipped demo model: a small CNN whose true Jacobian is known.

Task (``augnet/_demo.py``): a 256x256 grayscale image in ``[0, 1]`` -> 13 numbers, output ``k`` =
mean brightness of region ``k`` (12 square tiles around a centre disc). The exact Jacobian of output
``k`` is ``mask_k / area_k``, so the trained network's saliency maps can be checked.

The network (13,330 parameters, a ~0.2 MB ``.keras`` file)::

    image (256, 256, 1)
      -> AveragePooling2D(4)                                (64, 64, 1)   fixed 4x4 average
      -> Conv2D(1, 2, strides=2, non-negative)              (32, 32, 1)   one value per 8x8 block
      -> Flatten -> Dense(13, non-negative, zero init)      (13,)

Why this shape: a region mean is a weighted sum of pixels, so the fit is a least-squares problem
with one weight per 8x8 block and output; the tiles lie on the 8-pixel grid, so the network can
represent them exactly (the disc's edge only to within a block). The non-negative kernels say
what is true of the task -- a brighter pixel never lowers a region mean -- and they make the fit
sparse: a weight outside region ``k`` cannot be cancelled by another one, so training drives it to
zero instead of leaving noise everywhere. (Unconstrained, the same network reaches a similar test
error with only ~30-60% of its ``|J|`` inside the region: noise spread thinly over 60,000 pixels
adds up.) The convolution starts as an exact 8x8 average (constant 0.25 on the 4x4-pooled image);
with random initial kernels, the 2x2 kernel keeps an uneven weighting of the four 4x4 sub-blocks
that shows as a lattice in the saliency maps. There is no ReLU: the task is linear, and a ReLU only
made the Jacobian wrong on dark images (a learned bias of -0.013 switched it off below brightness
~0.014, so a black image got an all-zero Jacobian).

Data: synthetic, generated here, seeded, no downloads -- mosaics of random cells, smooth random
fields, rectangles, Gaussian blobs and ramps, mixed and rescaled. Training images are drawn at
64x64 and upsampled 4x (the first layer averages 4x4 pixels, so nothing finer can matter);
held-out images are drawn the same way but upsampled bilinearly with pixel noise added, and the
sample photograph is held out too.

Run it (about 2 minutes on a 2-core CPU)::

    python examples/train_region_model.py --overwrite          # replaces augnet/data/region_cnn.keras
    python examples/train_region_model.py --out /tmp/m.keras --epochs 1
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from augnet._demo import (
    IMAGE_SIZE,
    N_REGIONS,
    demo_model_path,
    load_sample_image,
    mass_inside,
    region_targets,
)

COARSE = IMAGE_SIZE // 4  # training images are drawn at 64x64 and upsampled 4x


# ---------------------------------------------------------------------------------------------
# Synthetic images
# ---------------------------------------------------------------------------------------------
_ROWS, _COLS = np.mgrid[0:COARSE, 0:COARSE].astype(np.float64)


def _resize(a: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    return np.asarray(
        Image.fromarray(a.astype(np.float32), mode="F").resize((size, size), resample)
    )


def _smooth_field(rng: np.random.Generator) -> np.ndarray:
    n = int(rng.choice([2, 3, 4, 6, 8, 12, 16, 24, 32]))
    return _resize(rng.random((n, n)), COARSE, Image.Resampling.BICUBIC)


def _mosaic(rng: np.random.Generator) -> np.ndarray:
    cell = int(rng.choice([1, 1, 2, 2, 4]))  # 4 to 16 pixels at full size
    n = COARSE // cell + 2
    big = np.kron(rng.random((n, n)), np.ones((cell, cell)))
    dy, dx = rng.integers(0, cell, 2)
    return big[dy : dy + COARSE, dx : dx + COARSE]


def _rectangles(rng: np.random.Generator) -> np.ndarray:
    img = np.full((COARSE, COARSE), rng.random())
    for _ in range(rng.integers(1, 12)):
        y0, x0 = rng.integers(-8, COARSE, 2)
        h, w = rng.integers(1, 40, 2)
        img[max(y0, 0) : y0 + h, max(x0, 0) : x0 + w] = rng.random()
    return img


def _blobs(rng: np.random.Generator) -> np.ndarray:
    img = np.zeros((COARSE, COARSE))
    for _ in range(rng.integers(1, 8)):
        cy, cx = rng.uniform(-5, COARSE + 5, 2)
        r = rng.uniform(1, 20)
        img += rng.uniform(-1, 1) * np.exp(-((_ROWS - cy) ** 2 + (_COLS - cx) ** 2) / (2 * r * r))
    return img


def _ramp(rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi)
    return np.cos(angle) * _COLS + np.sin(angle) * _ROWS


_KINDS = (_mosaic, _smooth_field, _rectangles, _blobs, _ramp)
_KIND_WEIGHTS = np.array([5.0, 1.0, 1.0, 1.0, 0.5]) / 8.5  # mosaics pin down each block's weight


def coarse_image(rng: np.random.Generator) -> np.ndarray:
    """One random ``(64, 64)`` float64 image in ``[0, 1]``: 1-2 mixed components, random contrast."""
    img = np.zeros((COARSE, COARSE))
    for kind in rng.choice(len(_KINDS), rng.integers(1, 3), replace=False, p=_KIND_WEIGHTS):
        part = _KINDS[kind](rng)
        img += rng.uniform(0.3, 1.0) * (part - part.min()) / (np.ptp(part) + 1e-9)
    img = (img - img.min()) / (np.ptp(img) + 1e-9)
    low, high = rng.uniform(0.0, 0.4), rng.uniform(0.6, 1.0)
    img = low + (high - low) * img + rng.uniform(0, 0.05) * rng.standard_normal(img.shape)
    return np.clip(img, 0.0, 1.0)


def upsample(coarse: np.ndarray) -> np.ndarray:
    """``(n, 64, 64)`` -> ``(n, 256, 256, 1)`` float32 by repeating each pixel 4x4."""
    return np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)[..., None].astype(np.float32)


def make_images(n: int, seed: int, *, smooth: bool = True) -> np.ndarray:
    """``n`` synthetic ``(256, 256, 1)`` float32 images in ``[0, 1]`` (held-out style).

    With ``smooth=True`` (the default), images are upsampled bilinearly and get pixel noise, so
    they are not made of the 4x4 blocks the training images are made of.
    """
    rng = np.random.default_rng(seed)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.float32)
    for i in range(n):
        img = coarse_image(rng)
        if smooth:
            img = _resize(img, IMAGE_SIZE, Image.Resampling.BILINEAR)
            img = img + rng.uniform(0, 0.05) * rng.standard_normal(img.shape)
        else:
            img = np.repeat(np.repeat(img, 4, axis=0), 4, axis=1)
        images[i, :, :, 0] = np.clip(img, 0.0, 1.0)
    return images


class CoarseImages(keras.utils.PyDataset):
    """Batches of ``(256, 256, 1)`` images upsampled from a ``(n, 64, 64)`` uint8 array, and their
    region means; reshuffled (seeded) every epoch."""

    def __init__(self, coarse: np.ndarray, batch_size: int, seed: int):
        super().__init__()
        self.coarse = coarse
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(coarse))
        # Exact targets of the images the model sees (the quantised, upsampled ones).
        self.targets = np.concatenate(
            [
                region_targets(upsample(coarse[i : i + 512] / np.float32(255)))
                for i in range(0, len(coarse), 512)
            ]
        )

    def __len__(self) -> int:
        return len(self.coarse) // self.batch_size

    def __getitem__(self, index: int):
        rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        return upsample(self.coarse[rows] / np.float32(255)), self.targets[rows]

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(len(self.coarse))


# ---------------------------------------------------------------------------------------------
# Model, training, evaluation
# ---------------------------------------------------------------------------------------------
def build_model() -> keras.Model:
    """The demo CNN, ``(batch, 256, 256, 1) -> (batch, 13)``."""
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1), name="image")
    x = keras.layers.AveragePooling2D(4, name="average_4x4")(inputs)
    x = keras.layers.Conv2D(
        1,
        2,
        strides=2,
        kernel_initializer=keras.initializers.Constant(0.25),
        kernel_constraint=keras.constraints.NonNeg(),
        name="conv_8x8_blocks",
    )(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(
        N_REGIONS,
        kernel_initializer="zeros",
        kernel_constraint=keras.constraints.NonNeg(),
        name="region_means",
    )(x)
    return keras.Model(inputs, outputs, name="region_cnn")


def tape_jacobian(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Plain per-output ``tf.GradientTape`` Jacobian, ``(batch, 13, 256, 256, 1)``."""
    x = tf.convert_to_tensor(x)
    rows = []
    for k in range(N_REGIONS):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y_k = model(x, training=False)[:, k]
        rows.append(tape.gradient(y_k, x))
    return tf.stack(rows, axis=1).numpy()


def evaluate(model: keras.Model, seed: int = 12345, n_test: int = 512) -> dict:
    """Test MAE on held-out synthetic images, and the share of ``|J_k|`` inside region ``k``."""
    x_test = make_images(n_test, seed)
    mae = float(
        np.abs(model.predict(x_test, batch_size=64, verbose=0) - region_targets(x_test)).mean()
    )
    photo = load_sample_image()
    photo_mae = float(np.abs(np.asarray(model(photo)) - region_targets(photo)).mean())
    inside_synthetic = mass_inside(tape_jacobian(model, x_test[:16]))  # (16, 13)
    inside_photo = mass_inside(tape_jacobian(model, photo))[0]  # (13,)
    return {
        "test_mae": mae,
        "photo_mae": photo_mae,
        "mass_inside_synthetic_min": inside_synthetic.min(axis=0),
        "mass_inside_photo": inside_photo,
    }


def train(
    *, epochs: int, n_train: int, batch_size: int, learning_rate: float, seed: int
) -> tuple[keras.Model, float]:
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    coarse = np.empty((n_train, COARSE, COARSE), dtype=np.uint8)
    for i in range(n_train):
        coarse[i] = np.round(coarse_image(rng) * 255)
    data = CoarseImages(coarse, batch_size, seed)
    print(f"generated {n_train} training images in {time.perf_counter() - start:.1f} s")

    model = build_model()
    steps = epochs * len(data)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=steps)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="mse", metrics=["mae"])
    start = time.perf_counter()
    model.fit(data, epochs=epochs, verbose=2)
    return model, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, default=demo_model_path(), help="the .keras file to write"
    )
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--n-train", type=int, default=20000, help="number of training images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    if args.out.suffix != ".keras":
        parser.error(f"--out must end in .keras, got {str(args.out)!r}")
    if args.out.exists() and not args.overwrite:
        parser.error(f"{args.out} exists; pass --overwrite to replace it")

    model, seconds = train(
        epochs=args.epochs,
        n_train=args.n_train,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.save(args.out)
    size_kb = args.out.stat().st_size / 1024
    print(
        f"trained in {seconds:.0f} s; saved {args.out} ({model.count_params()} parameters, "
        f"{size_kb:.0f} KiB)"
    )

    result = evaluate(model)
    with np.printoptions(precision=3, linewidth=120):
        print(
            f"test MAE (held-out synthetic): {result['test_mae']:.4f}; "
            f"sample photo MAE: {result['photo_mae']:.4f}"
        )
        print(
            f"share of |J_k| inside region k, worst of 16 held-out images:\n"
            f"  {result['mass_inside_synthetic_min']}"
        )
        print(f"share of |J_k| inside region k, sample photo:\n  {result['mass_inside_photo']}")
    worst = min(result["mass_inside_synthetic_min"].min(), result["mass_inside_photo"].min())
    if not math.isfinite(worst) or worst < 0.8:
        print(f"WARNING: worst share inside is {worst:.3f} < 0.8; train longer (--epochs)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

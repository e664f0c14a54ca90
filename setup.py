"""Package metadata for augnet (the one source of it)."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="augnet",
    version="1.0.0",
    description=(
        "Exact per-sample Jacobians of trained Keras models, fast and inside a "
        "memory budget, and saliency images to look at."
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["augnet", "augnet.*"]),
    include_package_data=True,
    package_data={"augnet": ["data/*", "_html_assets/*"]},
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3",
        "numpy>=1.24",
        "pillow>=9",
        "matplotlib>=3.6",
        "h5py>=3.8",
    ],
    extras_require={
        # Keras on JAX (KERAS_BACKEND=jax): the CPU wheels; for a GPU install JAX's CUDA wheels
        "jax": ["jax==0.10.2", "jaxlib==0.10.2"],
        # Ray Data for `augnet.ray` (and the distributed data-set run), pinned as tested
        "ray": ["ray[data]==2.60.0"],
        # The attribution peers (tf-keras-vis, PAIR saliency) install in seconds with our stack
        # (~40 MB with scikit-image), so CI compares augnet's methods with theirs. xplique pins
        # tensorflow[and-cuda]<=2.20 and is left out: see docs/attribution.md to add it by hand.
        "attribution-peers": ["tf-keras-vis==0.8.7", "saliency==0.2.1"],
        # the tests run everything: the numeric tests on every backend installed
        # (tests/test_backends.py), Ray's tests, the report page in a browser (Selenium drives the
        # system's Chromium; .ci/run installs it when it is missing), the attribution peers
        "test": [
            "pytest>=7",
            "jax==0.10.2",
            "jaxlib==0.10.2",
            "torch==2.13.0",
            "ray[data]==2.60.0",
            "selenium>=4.11",
            "tf-keras-vis==0.8.7",
            "saliency==0.2.1",
        ],
        # torch pinned: a plain "torch" can pull a multi-GB CUDA build; 2.13.0 is the CPU wheel here
        "torch": ["torch==2.13.0"],
        "bench": ["torch==2.13.0", "jax==0.10.2", "jaxlib==0.10.2"],
        "dev": ["pytest>=7", "ruff"],
    },
    entry_points={"console_scripts": ["augnet=augnet._cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: MIT License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)

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
    package_data={"augnet": ["data/*"]},
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3",
        "numpy>=1.24",
        "pillow>=9",
        "matplotlib>=3.6",
        "h5py>=3.8",
    ],
    extras_require={
        # torch pinned: a plain "torch" can pull a multi-GB CUDA build; 2.13.0 is the CPU wheel here
        "torch": ["torch==2.13.0"],
        # the test suite runs the numeric tests on every backend installed (torch's included)
        "test": ["pytest>=7", "torch==2.13.0"],
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

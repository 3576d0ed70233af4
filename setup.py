"""albef-ds: DeepSpeed-scaled ALBEF pre-training.

The design card keeps `kernels/` and `launcher/` as top-level folders; they install as the sub-packages
`albef_ds.kernels` and `albef_ds.launcher` so that no top-level import name shadows a PyPI project
(there is an unrelated PyPI package called `kernels`).
"""

from setuptools import setup

PACKAGES = [
    "albef_ds",
    "albef_ds.model",
    "albef_ds.data",
    "albef_ds.train",
    "albef_ds.train.checkpoint",
    "albef_ds.tasks",
    "albef_ds.eval",
    "albef_ds.bench",
    "albef_ds.kernels",
    "albef_ds.launcher",
]

setup(
    name="albef-ds",
    version="0.1.0",
    description="DeepSpeed-scaled pre-training and fine-tuning of ALBEF (Align before Fuse)",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"albef_ds": "albef_ds", "albef_ds.kernels": "kernels", "albef_ds.launcher": "launcher"},
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "timm>=1.0",
        "transformers>=5.0",
        "tokenizers",
        "safetensors",
        "pyyaml",
        "pillow",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "dev": ["pytest", "ruff"],
        "deepspeed": ["deepspeed==0.19.8"],
        "viz": ["matplotlib"],  # grounding pictures (albef_ds.eval.grounding_viz)
    },
    entry_points={"console_scripts": ["albef-ds=albef_ds.cli:main"]},
)

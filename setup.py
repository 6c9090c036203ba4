"""m2ae-infer: local-motion deblurring with adaptive pixel pruning.

One import namespace, ``m2ae_infer``: the repo's top-level ``kernels/``, ``export/`` and ``benchmarks/``
folders install as ``m2ae_infer.kernels``, ``m2ae_infer.export`` and ``m2ae_infer.benchmarks``.
"""
from setuptools import setup

PACKAGES = {
    "m2ae_infer": "m2ae_infer",
    "m2ae_infer.model": "m2ae_infer/model",
    "m2ae_infer.data": "m2ae_infer/data",
    "m2ae_infer.distributed": "m2ae_infer/distributed",
    "m2ae_infer.kernels": "kernels",
    "m2ae_infer.export": "export",
    "m2ae_infer.benchmarks": "benchmarks",
}

setup(
    name="m2ae-infer",
    version="0.1.0",
    description="Local-motion deblurring that computes only where the picture is blurred",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"m2ae_infer": ["assets/*"]},
    include_package_data=True,
    # torch is declared as a range, never pinned to a build: the CPU wheel is installed first
    # (see README); an unpinned resolve would fetch a multi-GB CUDA build.
    install_requires=["torch>=2.4", "numpy>=1.24", "pillow>=10", "safetensors>=0.4", "tqdm>=4.60"],
    extras_require={
        "onnx": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1"],
        # backend="openvino" (export/openvino.py): the ONNX graphs in OpenVINO's CPU plugin; tested with 2026.4.1
        "openvino": ["openvino>=2024.0", "onnx>=1.16", "onnxscript>=0.1"],
        "gpu": ["triton>=3.0", "onnxruntime-gpu>=1.18"],
        "trt": ["tensorrt>=10"],
        "train": ["scikit-image>=0.22", "av>=12"],
        # m2ae-deblur --ray and m2ae-serve (m2ae_infer.distributed, m2ae_infer.serve); tested with ray 2.60.0
        "ray": ["ray[serve]>=2.9"],
        "bench": ["matplotlib>=3.7", "scikit-image>=0.22", "onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1"],
        "test": ["pytest>=8", "scikit-image>=0.22", "matplotlib>=3.7", "onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1",
                 "triton==3.7.1; platform_system == 'Linux'"],
    },
    entry_points={
        "console_scripts": [
            "m2ae-deblur=m2ae_infer.cli:main",
            "m2ae-train=m2ae_infer.entry:train",
            "m2ae-eval=m2ae_infer.evaluate:main",
            "m2ae-export=m2ae_infer.export.cli:main",
            "m2ae-bench=m2ae_infer.entry:bench",
            "m2ae-data=m2ae_infer.data.corpus:main",
            "m2ae-serve=m2ae_infer.entry:serve",
        ],
    },
)

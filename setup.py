from setuptools import setup

setup(
    name="moshivis-kernels",
    version="0.1.0",
    description="Triton kernels and a streaming runtime for Kyutai's MoshiVis",
    python_requires=">=3.10",
    packages=["moshivis", "moshivis.backends", "moshivis_kernels"],
    package_dir={"moshivis_kernels": "kernels"},
    install_requires=["torch", "triton", "numpy", "safetensors"],
    extras_require={
        "dev": ["pytest", "pytest-benchmark"],
        "bench": ["matplotlib", "nvtx", "bitsandbytes"],
        "serve": [],
    },
)

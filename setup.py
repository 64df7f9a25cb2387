from setuptools import setup

# Ranges: what the pinned set (requirements-cpu.txt) and `make test-latest` (the newest transformers these
# ranges allow) test. triton 3.9's interpreter rejects our kernels' masks, so triton stays below 3.7.
setup(
    name="moshivis-kernels",
    version="0.1.0",
    description="Triton kernels and a streaming runtime for Kyutai's MoshiVis",
    python_requires=">=3.10",
    packages=["moshivis", "moshivis.backends", "moshivis.serve", "moshivis_kernels"],
    package_dir={"moshivis_kernels": "kernels/moshivis_kernels"},
    # The browser page, served at / from the installed package (no CDN: it works offline).
    package_data={"moshivis.serve": ["web/*"]},
    install_requires=["torch>=2.13", "triton>=3.6,<3.7", "numpy", "safetensors"],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "pytest-xdist", "packaging", "transformers>=5.24,<6", "sentencepiece>=0.2",
                "pillow", "websockets>=17.4", "sphn>=0.2,<0.3", "playwright"],
        "chat": ["transformers>=5.24,<6", "sentencepiece>=0.2", "pillow"],
        "bench": ["matplotlib", "nvtx", "bitsandbytes", "websockets>=17.4", "transformers>=5.24,<6"],
        "serve": ["websockets>=17.4", "sphn>=0.2,<0.3"],
        # Ray Serve: many engines (one per GPU, many machines) behind one address (moshivis.cluster).
        "cluster": ["ray[serve]==2.60.0", "fastapi>=0.115", "starlette>=0.40", "uvicorn>=0.30", "pyyaml",
                    "websockets>=17.4", "sphn>=0.2,<0.3"],
    },
)

"""big_vision_like: vision encoders in JAX/Flax NNX (ViT first), one trainer for all objectives."""
from setuptools import find_packages, setup

setup(
    name="big_vision_like",
    version="0.1.0",
    description="ViT / Swin / Perceiver-IO encoders under supervised, CLIP, SigLIP, MAE "
                "and DINO objectives, from one config, in JAX + Flax NNX.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["big_vision_like", "big_vision_like.*"]),
    # ops.cpu_gemm compiles this on first use, on the user's machine.
    package_data={"big_vision_like.ops": ["cpu_gemm.cc"]},
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "array_record>=0.8.6",
        "ml_collections>=1.1.0",
        "chex>=0.1.92",
        "absl-py>=2.1",
        "numpy>=1.26",
        "pillow>=10.0",
        "scikit-learn>=1.4",  # the bundled digits dataset of the default config
        "tensorboardX>=2.6",
        "sentencepiece>=0.2",  # optional SentencePiece text tokenizer (CLIP / SigLIP)
        "matplotlib>=3.8",  # experiments' plots, notebooks
        "scipy-openblas32>=0.3.28",  # ops.cpu_gemm: OpenBLAS matmuls on CPU
    ],
    # The tests also execute notebooks/ in a Jupyter kernel; pytest-xdist runs them
    # in two worker processes (most tests wait on one-threaded XLA compiles).
    extras_require={"test": ["pytest>=8.0", "pytest-xdist>=3.5", "nbclient>=0.10",
                             "nbformat>=5.10", "ipykernel>=6.29"]},
    classifiers=["Programming Language :: Python :: 3.11",
                 "Programming Language :: Python :: 3.12"],
)

"""mtjax: multitask learning of language models in JAX/Flax."""
import setuptools

# Versions that install together on Python 3.11 (checked on a fresh machine).
INSTALL_REQUIRES = [
    "jax[cpu]==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    # gs:// (and other URL) workdirs: every run output goes through epath.
    "etils[epath]==1.15.0",
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "ml-collections==1.1.0",
    "clu==0.0.12",
    "tensorboard>=2.20",
    "safetensors==0.8.0",
    "gguf==0.19.0",
    "sentencepiece==0.2.3",
    "tokenizers==0.23.3",
    "jinja2>=3.1",
    "pyyaml>=6",
    "tqdm>=4.60",
    "matplotlib>=3.8",
]
TEST_REQUIRES = [
    "pytest>=8",
    "pytest-xdist>=3.6",
    "ruff==0.17.6",
    "torch==2.13.0",
    "transformers==5.24.0",
    "peft==0.21.2",
    "nbclient==0.11.0",
    "nbformat>=5.10",
    "ipykernel>=6",
    # tests/test_remote_paths.py: a gs:// workdir on a local GCS emulator.
    "gcsfs==2026.10.1",
    "gcp-storage-emulator==2026.7.19",
]

setuptools.setup(
    name="mtjax",
    version="0.1.0",
    description="Multitask learning of language models in JAX/Flax.",
    packages=setuptools.find_packages(include=["mtjax", "mtjax.*", "configs"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
)

from setuptools import find_packages, setup

setup(
    name="gpt-triton",
    version="0.1.0",
    description="A GPT-2 style language model from scratch in PyTorch, with hand-written Triton kernels.",
    packages=find_packages(include=["model", "model.*", "kernels", "kernels.*"]),
    # GPT-2's BPE files (model/tokenizer.py): the tokenizer needs no download.
    package_data={"model": ["gpt2_bpe/*"]},
    python_requires=">=3.10",
    # torch is not pinned here on purpose: an unpinned `torch` would pull a multi-GB CUDA build on a
    # CPU machine. README's install command pins the CPU wheel; a GPU machine brings its own torch.
    install_requires=[
        "torch>=2.4",
        "triton>=3.2",
        "tiktoken>=0.7",
        "einops>=0.8",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "safetensors>=0.4",
        # NumPy's BLAS on one thread in Triton's interpreter (kernels/_common.py): its tl.dot is np.matmul.
        "threadpoolctl>=3.1",
    ],
    # hf: Hugging Face transformers, only as an optional baseline of bench/test_bench_hf.py.
    extras_require={"test": ["pytest>=8", "pytest-benchmark>=4"], "hf": ["transformers"]},
)

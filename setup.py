"""lavis-c2f: coarse-to-fine video corpus moment retrieval as a Salesforce LAVIS plugin."""
from pathlib import Path

from setuptools import find_namespace_packages, setup

HERE = Path(__file__).parent

setup(
    name="lavis-c2f",
    version="0.1.0",
    description="Coarse-to-fine video corpus moment retrieval (T-MASS retrieval, "
    "MESM/QD-DETR grounding, BLIP-2 refinement) as a Salesforce LAVIS plugin",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # namespace discovery so the YAML-only folders under lavis_c2f/configs are packages too
    packages=find_namespace_packages(include=["lavis_c2f", "lavis_c2f.*"]),
    include_package_data=True,
    package_data={"lavis_c2f.configs": ["**/*.yaml", "*.yaml"]},
    install_requires=[
        "salesforce-lavis==1.0.2",
        "torch==2.14.1",
        "torchvision==0.29.1",
        "transformers>=4.25,<4.27",
        "numpy<2",
        "pandas<2.3",
        "scipy<1.14",
        "scikit-image<0.25",
        "omegaconf",
        "decord",
        "webdataset",
        "h5py",
        "tqdm",
        "matplotlib",
        "faiss-cpu",
        "nltk>=3.9",            # MESM part-of-speech masking weights (its tagger)
        "textblob-aptagger",    # ships the averaged-perceptron tagger data (no download)
        "av",
        "tensorboard",      # run.tensorboard (on by default): torch.utils.tensorboard writes the events
        "srt",              # SRT subtitles (lavis_c2f.video.captions)
        "webvtt-py",        # WebVTT subtitles
        "fastapi>=0.115",   # `lavis-c2f serve` (the HTTP search service) ...
        "fastapi-offline",  # ... its OpenAPI page without a CDN (Swagger UI files in the package)
        "uvicorn",          # ... and its server
        "filelock",     # one process builds a shared asset folder while the other ranks wait (tiny refiner)
        "peft==0.6.2",  # the refiner's LoRA, named as CALCE's checkpoints (works with transformers 4.26)
    ],
    extras_require={
        # `lavis-c2f demo` (the web app) and its browser tests (Playwright drives the system
        # Chromium; requirements-lock.txt pins both)
        "demo": ["streamlit>=1.40"],
        # the c2f_feature_slowfast backbone (SlowFast R50 from pytorchvideo's model builders)
        "slowfast": ["pytorchvideo==0.1.5"],
        # the Milvus backend of the stage-1 index (`--out corpus.db` / `http://host:19530`);
        # pyarrow 26 needs numpy>=2 at import and milvus-lite imports pyarrow
        "milvus": ["pymilvus>=3.0,<4", "milvus-lite>=3.2,<4", "pyarrow>=15,<26"],
        "dev": ["pytest", "playwright"],
    },
    entry_points={"console_scripts": ["lavis-c2f=lavis_c2f.cli:main"]},
)

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
version = {}
exec((ROOT / "nnalign" / "__init__.py").read_text(), version)

setup(
    name="nnalign",
    version=version["__version__"],
    description="Self-configuring missing-modality brain tumour segmentation with latent alignment, on nnU-Net v2",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["nnalign", "nnalign.*"]),
    package_data={"nnalign.data": ["splits/*.txt"], "nnalign.experiments": ["presets/*.toml", "iteration_times.toml"]},
    install_requires=[
        "nnunetv2==2.8.1",
        "dynamic-network-architectures>=0.4,<0.5",
        "batchgeneratorsv2>=0.3",
        "batchgenerators>=0.25",
        # The upper bound keeps `pip install` on a release nnunetv2 2.8.1 was tested with.
        "torch>=2.3,<2.15",
        "SimpleITK>=2.2",
        "numpy>=1.24",
        "scipy>=1.10",
        "tqdm>=4.60",
        "matplotlib>=3.6",
        "medpy>=0.5",
        "submitit>=1.5",
    ],
    # openvino: nnalign_predict --backend openvino (tested with 2026.4.0); the tests check it against torch.
    extras_require={
        "openvino": ["openvino>=2026.4"],
        # the official BraTS lesion-wise scores (nnalign_evaluate --lesionwise); it holds numpy below 2.3 (panoptica)
        "lesionwise": ["brats-evaluation>=0.0.10,<0.1"],
        # NNCF: the int8 per-tile figure of benchmarks/predict_tile.py
        "test": ["pytest>=7", "pytest-xdist>=3.5", "openvino>=2026.4", "brats-evaluation>=0.0.10,<0.1", "nncf>=3.4"],
    },
    entry_points={
        "console_scripts": [
            "nnalign_convert_brats=nnalign.cli.convert_brats:main",
            "nnalign_synth=nnalign.cli.synth:main",
            "nnalign_plan_and_preprocess=nnalign.cli.plan_and_preprocess:main",
            "nnalign_train=nnalign.cli.train:main",
            "nnalign_evaluate=nnalign.cli.evaluate:main",
            "nnalign_demo=nnalign.cli.demo:main",
            "nnalign_report=nnalign.cli.report:main",
            "nnalign_predict=nnalign.cli.predict:main",
            "nnalign_experiment=nnalign.cli.experiment:main",
        ]
    },
)

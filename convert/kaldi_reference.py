"""Test scaffolding: Transformers' ``Xcodec2FeatureExtractor`` as the reference, runnable without torchaudio's
C extension.

Transformers' extractor imports ``torchaudio`` and calls ``torchaudio.compliance.kaldi.fbank``, which is pure
PyTorch. The ``torchaudio`` wheel on PyPI is a CUDA build whose extension (``_torchaudio.abi3.so``) fails to
load on a CPU-only machine, so ``import torchaudio`` raises and the reference cannot run as is.

``reference_feature_extractor()`` therefore:

1. uses the real ``torchaudio`` when it imports (e.g. on a GPU machine);
2. otherwise puts a minimal stand-in ``torchaudio`` package in ``sys.modules`` whose only content is the
   *installed, unmodified* ``torchaudio/compliance/kaldi.py``, loaded by file path. ``kaldi.py`` needs only
   ``import torchaudio`` to succeed at import time, and ``fbank`` touches no other ``torchaudio`` attribute
   (only ``mfcc`` would, through ``torchaudio.functional``, which the stand-in deliberately lacks).

Transformers' feature-extraction module is imported only after that, so the extractor runs unchanged on the
same Kaldi code. Requires ``pip install --no-deps torchaudio==2.11.0`` (the Python files only are used).
Nothing under ``xcodec2_jax/`` may import this module; ``tests/conftest.py`` installs it before any
Transformers import, because with torchaudio installed even ``transformers.models.xcodec2.modeling_xcodec2``
imports it (through ``transformers.audio_utils``).
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any


def _real_torchaudio_works() -> bool:
    try:
        import torchaudio.compliance.kaldi  # noqa: F401
    except (ImportError, OSError):
        # A failed import can leave half-initialised submodules behind; drop them before the stand-in.
        for name in [n for n in sys.modules if n == "torchaudio" or n.startswith("torchaudio.")]:
            del sys.modules[name]
        return False
    return True


def _stand_in_package(name: str) -> types.ModuleType:
    # A __spec__ is needed because Transformers probes availability with importlib.util.find_spec, which
    # consults sys.modules first; an empty __path__ makes it a package so submodule imports resolve.
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    module.__path__ = []
    return module


def _install_torchaudio_stand_in() -> None:
    spec = importlib.util.find_spec("torchaudio")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("torchaudio is not installed: pip install --no-deps torchaudio==2.11.0")
    kaldi_path = Path(next(iter(spec.submodule_search_locations))) / "compliance" / "kaldi.py"

    torchaudio = _stand_in_package("torchaudio")
    torchaudio.__doc__ = "Test stand-in: only torchaudio.compliance.kaldi (see convert/kaldi_reference.py)."
    torchaudio.__version__ = importlib.metadata.version("torchaudio")
    compliance = _stand_in_package("torchaudio.compliance")
    torchaudio.compliance = compliance
    sys.modules["torchaudio"] = torchaudio
    sys.modules["torchaudio.compliance"] = compliance

    kaldi_spec = importlib.util.spec_from_file_location("torchaudio.compliance.kaldi", kaldi_path)
    kaldi = importlib.util.module_from_spec(kaldi_spec)
    sys.modules["torchaudio.compliance.kaldi"] = kaldi
    kaldi_spec.loader.exec_module(kaldi)
    compliance.kaldi = kaldi


def reference_kaldi() -> types.ModuleType:
    """``torchaudio.compliance.kaldi`` (real, or loaded by the stand-in), for component-level checks."""
    if "torchaudio.compliance.kaldi" not in sys.modules and not _real_torchaudio_works():
        _install_torchaudio_stand_in()
    return sys.modules["torchaudio.compliance.kaldi"]


def reference_feature_extractor(**kwargs: Any):
    """Transformers' own ``Xcodec2FeatureExtractor(**kwargs)``, with a working ``torchaudio.compliance.kaldi``."""
    reference_kaldi()  # before Transformers' module is imported, so its `import torchaudio` succeeds
    from transformers.models.xcodec2.feature_extraction_xcodec2 import Xcodec2FeatureExtractor

    return Xcodec2FeatureExtractor(**kwargs)

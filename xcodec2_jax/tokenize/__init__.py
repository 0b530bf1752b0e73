"""Corpus tokenization: audio corpora in, shards of X-Codec2 code rows out (Parquet or ArrayRecord).

Split by job: :mod:`.sources` (inputs: folders, manifests, WebDataset tar shards, Parquet, 🤗 datasets),
:mod:`.pipeline` (the job: shares, loading with retries, encoding, detokenizing), :mod:`.store` (the output
folder: shards, error logs, manifest, exactly once), :mod:`.checkpoint` (loading a model and what its codes
depend on) and :mod:`.dataset` (reading rows back for training through Grain). The command line is
``xcodec2-jax tokenize`` / ``detokenize`` (:mod:`xcodec2_jax.cli`).
"""

from .checkpoint import LoadedModel, load_model
from .dataset import CodesDataSource
from .pipeline import TokenizeSummary, detokenize_corpus, tokenize_corpus, wav_path
from .sources import Clip, Corpus, CorpusError, CorpusItem, list_corpus, open_corpus
from .store import FORMATS, TokenizeError, read_codes, read_errors, row_schema

__all__ = [
    "FORMATS",
    "Clip",
    "CodesDataSource",
    "Corpus",
    "CorpusError",
    "CorpusItem",
    "LoadedModel",
    "TokenizeError",
    "TokenizeSummary",
    "detokenize_corpus",
    "list_corpus",
    "load_model",
    "open_corpus",
    "read_codes",
    "read_errors",
    "row_schema",
    "tokenize_corpus",
    "wav_path",
]

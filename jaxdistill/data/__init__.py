"""Training data: raw documents (`corpus`), the packed, batched input pipeline (`pipeline`) and the alignment
of two tokenizers' vocabularies and positions for distillation across tokenizers (`alignment`)."""

from jaxdistill.data.alignment import ALIGNED_KEYS, token_bytes, vocab_mapping
from jaxdistill.data.corpus import STDLIB_DOCS, DataError, load_documents
from jaxdistill.data.pipeline import DataConfig, DataPipeline, pack_sequences, split_documents

__all__ = ["ALIGNED_KEYS", "STDLIB_DOCS", "DataConfig", "DataError", "DataPipeline", "load_documents",
           "pack_sequences", "split_documents", "token_bytes", "vocab_mapping"]

"""Training data: raw documents (`corpus`) and the packed, batched input pipeline (`pipeline`)."""

from jaxdistill.data.corpus import STDLIB_DOCS, DataError, load_documents
from jaxdistill.data.pipeline import DataConfig, DataPipeline, pack_sequences, split_documents

__all__ = ["STDLIB_DOCS", "DataConfig", "DataError", "DataPipeline", "load_documents", "pack_sequences",
           "split_documents"]

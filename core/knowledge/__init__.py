"""Departmental knowledge bases: documents -> chunks -> one index per knowledge base -> retrieval.

``documents`` reads files into headed sections, ``chunking`` cuts sections into chunks
along headings and sentences (Chinese included), ``embedder`` turns text into vectors,
``store`` keeps each knowledge base's index on disk (written aside, swapped atomically),
``ingest`` builds it incrementally, ``index`` searches one knowledge base (dense + BM25)
and ``retriever`` answers for a bot from exactly the knowledge bases it is granted.
"""

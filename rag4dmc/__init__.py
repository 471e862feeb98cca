"""rag4dmc: retrieval-augmented completion of missing modalities in image-text corpora, on Ray.

One installed namespace over the repository's three top-level folders, which rag4dmc/ links in:
``rag4dmc.pipeline`` (pipeline/: configuration, I/O, the knowledge base, the job, evaluation, CLI),
``rag4dmc.actors`` (actors/: the callable classes Ray runs) and ``rag4dmc.deploy`` (deploy/: the Serve
application). Nothing else is installed at the top level, so no name here can shadow another distribution's
``pipeline`` or ``deploy``. The map of the packages and the data flow: docs/architecture.md.
"""

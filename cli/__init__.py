"""scribeline: synthetic handwritten-line datasets and the recognizers trained on them.

The import package is assembled from the repository's top-level folders (see
``[tool.setuptools.package-dir]`` in pyproject.toml):

- ``scribeline.platform`` (``platform/``): the core: glyph bank, corpus, renderer,
  dataset format, storage, settings.
- ``scribeline.workers`` (``workers/``): the heavy work on Ray.
- ``scribeline.flows`` (``flows/``): Prefect flows that orchestrate it.
- ``scribeline.main`` (``cli/main.py``): the ``scribeline`` command.
"""

__version__ = "0.1.0"

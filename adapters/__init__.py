"""attnflow's built-in adapters, installed as ``attnflow.adapters``.

Each module holds one framework or model family and is registered through the ``attnflow.adapters``
entry-point group in attnflow's pyproject, exactly as a third-party adapter would be. Modules import
their framework lazily, inside methods.
"""

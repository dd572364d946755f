"""Assembly: the ``lum`` command, the end-to-end demo, and deployment files.

The only package allowed to import both ``streaming`` and ``trainers``: it launches them, it does not mix them.
"""

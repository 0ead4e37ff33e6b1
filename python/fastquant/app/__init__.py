"""The application on top of the library: the ``fastquant`` command, the demo models and their evaluation, the
build and kernel report, and serving."""

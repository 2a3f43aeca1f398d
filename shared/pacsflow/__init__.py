"""pacsflow: the shared library every service is built from.

It owns configuration (:mod:`pacsflow.config`), the event catalogue (:mod:`pacsflow.events`),
the event bus (:mod:`pacsflow.bus`), state storage (:mod:`pacsflow.store`), DICOM networking
(:mod:`pacsflow.dicom`), metrics and logging, and the ``pacsflow`` command line.
"""

__version__ = "0.1.0"

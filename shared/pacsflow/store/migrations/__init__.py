"""Schema migrations of the shared library (component ``core``): the file ledger.

Files are named ``NNNN_name.sql``, or ``NNNN_name.postgres.sql`` and ``NNNN_name.sqlite.sql``
where the dialects differ; :mod:`pacsflow.store.migrate` applies them in order.
"""

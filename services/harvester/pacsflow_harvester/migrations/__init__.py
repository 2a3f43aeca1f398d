"""Schema migrations of the harvester (applied by ``pacsflow db upgrade``)."""

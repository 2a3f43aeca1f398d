"""The pacsflow router-scp service: a C-STORE SCP that routes by called AE title and reports
complete studies.

* :mod:`.scp`         the lean DICOM receiving side (upper layer, DIMSE, limits)
* :mod:`.header`      routing values read from received bytes
* :mod:`.paths`       the storage layout and the path sanitiser
* :mod:`.routes`      routes, the routes file and the association policy
* :mod:`.receiver`    storing one instance
* :mod:`.collector`   reports from the receivers, drained in batches
* :mod:`.studies`     the study table and completion claims
* :mod:`.completion`  the completion sweep and ``study-complete``
* :mod:`.workers`     several receiving processes
* :mod:`.router`      all of it wired; :mod:`.service` runs it
"""

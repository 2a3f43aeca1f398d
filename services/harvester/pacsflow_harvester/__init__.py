"""The pacsflow harvester service: bulk retrieval of a patient cohort from a PACS,
rate-limited, resumable and verified instance by instance.

* :mod:`.criteria`   which patients, studies and series (pattern, cohort, dates, modalities,
  plug-in)
* :mod:`.state`      the harvest in the state store: claims, leases, attempts, outcomes
* :mod:`.ratelimit`  the request budget shared by every worker and process
* :mod:`.windows`    pause and work windows
* :mod:`.pacs`       the source PACS: every request paced, gated and counted
* :mod:`.lean`       the lean C-FIND / C-MOVE SCU
* :mod:`.discovery`  the query stages: patients, studies, series
* :mod:`.layout`     where instances land (the router's layout), read back and written
* :mod:`.retrieve`   retrieving one series and proving it complete
* :mod:`.archive`    patient zips
* :mod:`.report`     what ``pacsflow harvest`` shows
* :mod:`.harvester`  all of it wired; :mod:`.service` runs it
"""

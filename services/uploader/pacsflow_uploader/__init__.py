"""The pacsflow uploader service: file-ready events to C-STORE at one or more PACS.

* :mod:`.uploader`      the service's work: senders per destination, outcomes, events
* :mod:`.deliveries`    the work queue in the file ledger (claims, settlements, outbox)
* :mod:`.pool`          sender processes holding the associations
* :mod:`.slots`         one association, reused from chunk to chunk
* :mod:`.scu`, :mod:`.pdu`, :mod:`.files`  the lean C-STORE path, from file bytes to the wire
* :mod:`.backpressure`  the load gate, a destination's breaker, retry backoff
* :mod:`.send`          ``pacsflow send``: one-shot sending from the command line
"""

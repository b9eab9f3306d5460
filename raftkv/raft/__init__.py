"""The Raft engine: pysyncobj's groups, its thread, its port and the replica's files.

This package and :mod:`raftkv.shard` are the only modules that import pysyncobj; the rest of
raftkv sees a replica through :class:`raftkv.replica.Replica`.

* ``group.py``        a pysyncobj group on our storage and commands (its patches)
* ``conf_change.py``  membership entries: encode/parse, the configuration at an index
* ``driver.py``       the node's one Raft thread: poller, transport, ticks every group
* ``wire.py``         pysyncobj messages ⇄ protobuf ``RaftFrame`` (data only, never pickle)
* ``handshake.py``    peers prove who they are (secret challenge and/or mutual TLS)
* ``link.py``         one connection: framing, TLS, limits, timeouts
* ``transport.py``    the mux: one port, one link per peer, frames tagged by shard
* ``journal.py``      the checksummed log and term/vote file of one replica
* ``snapshot.py``     checksummed snapshot files, checked before they replace ours
* ``storage.py``      opening a replica's directory: every file checked against the others
"""

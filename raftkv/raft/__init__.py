"""The Raft port and the replica's files: what pysyncobj would otherwise do with pickles.

* ``wire.py``       pysyncobj messages ⇄ protobuf ``RaftFrame`` (data only, never pickle)
* ``handshake.py``  peers prove who they are (secret challenge and/or mutual TLS)
* ``link.py``       one connection: framing, TLS, limits, timeouts
* ``transport.py``  the mux: one port, one link per peer, frames tagged by shard
* ``journal.py``    the checksummed log and term/vote file of one replica
* ``snapshot.py``   checksummed snapshot files, checked before they replace ours
* ``storage.py``    opening a replica's directory: every file checked against the others
"""

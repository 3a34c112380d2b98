"""popdist.poptorch double: Options with the local replication factor already set."""

import poptorch

import popdist


class Options(poptorch.Options):
    def __init__(self, ipus_per_replica: int = 1) -> None:
        super().__init__()
        self.popdist = True
        self.ipus_per_replica = ipus_per_replica
        self.replication_factor = popdist.getNumLocalReplicas()

"""popdist.poptorch double: Options with the local replication factor already set; setting it again
raises, as popdist's Options do (poprun decides the replicas)."""

import poptorch

import popdist


class Options(poptorch.Options):
    def __init__(self, ipus_per_replica: int = 1) -> None:
        super().__init__()
        self.popdist = True
        self.ipus_per_replica = ipus_per_replica
        self.replication_factor = popdist.getNumLocalReplicas()
        self.init_before = bool(popdist.INIT_CALLS)  # whether popdist.init() ran before these options

    def replicationFactor(self, n: int) -> "Options":
        raise RuntimeError("Cannot call `replicationFactor` in popdist mode: poprun sets the replicas "
                           "(--num-replicas)")

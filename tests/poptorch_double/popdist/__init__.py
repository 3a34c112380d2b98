"""popdist double: reads the layout from POPDIST_* variables that tests set, as poprun would.

`init()` records that it ran (Graphcore calls it first, before horovod or any popdist.poptorch.Options);
`INIT_CALLS` lets tests check the order."""

import os
from typing import List

INIT_CALLS: List[int] = []  # one entry per init() call


def init() -> None:
    INIT_CALLS.append(1)


def isPopdistEnvSet() -> bool:
    return "POPDIST_NUM_INSTANCES" in os.environ


def getNumInstances() -> int:
    return int(os.environ.get("POPDIST_NUM_INSTANCES", "1"))


def getInstanceIndex() -> int:
    return int(os.environ.get("POPDIST_INSTANCE_INDEX", "0"))


def getNumTotalReplicas() -> int:
    return int(os.environ.get("POPDIST_NUM_TOTAL_REPLICAS", "1"))


def getNumLocalReplicas() -> int:
    return getNumTotalReplicas() // getNumInstances()


def getNumIpusPerReplica() -> int:
    return int(os.environ.get("POPDIST_NUM_IPUS_PER_REPLICA", "1"))

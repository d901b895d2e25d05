"""Names that travel between the ServerApp and the ClientApps, defined once for both sides.
(Plain strings: the core never imports Flower.)"""

# RecordDict keys
ARRAYS = "arrays"  # ArrayRecord: meta-parameters (server -> client, client -> server in "average")
GRADIENT = "meta-gradient"  # ArrayRecord: client -> server in "meta-gradient" fusion
OPTIMIZER = "optimizer-state"  # ArrayRecord {OPTIMIZER: 1-D}: a partition's kept local Adam (fedmeta.optim.pack_adam)
CORRECTION = "drift-correction"  # ArrayRecord, server -> client: c - c_i, shaped like ARRAYS (fedmeta.drift)
CONTROL = "control-variate"  # ArrayRecord, client -> server: the partition's new c_i, shaped like ARRAYS
CONFIG = "config"  # ConfigRecord: the run config (the kebab-case Config mapping), the same for every message
ROUND = "round"  # ConfigRecord: what this message is about (the keys below)
METRICS = "metrics"  # MetricRecord

# ROUND keys
SERVER_ROUND = "server-round"
PARTITION_ID = "partition-id"  # with assign-partitions: the partition this message asks the node to serve
NUM_PARTITIONS = "num-partitions"
OPTIMIZER_STEP = "optimizer-step"  # the kept local Adam's step count (also in train replies' metrics)
LR_FACTOR = "client-lr-factor"  # this round's factor on meta-lr (client-lr-schedule)

# MetricRecord keys in client replies
WEIGHT = "num-examples"  # the weight a client claims for its update (number of tasks it used)
NUM_TASKS = "num-tasks"
TRAIN_LOSS = "train-loss"  # mean local query loss (after adaptation) over the round's meta-batches
LOSS_PRE = "loss-pre"  # held-out query loss before adaptation
LOSS_POST = "loss-post"  # ... after `eval-steps` adaptation steps
ACCURACY_PRE = "accuracy-pre"
ACCURACY_POST = "accuracy-post"
SECONDS = "seconds"  # client-side compute time of the handler
HELDOUT = "heldout"  # 1 if the partition never trains (query replies)
# PARTITION_ID and NUM_PARTITIONS also name the partition a reply answers for (every reply carries them)

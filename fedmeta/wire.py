"""Names that travel between the ServerApp and the ClientApps, defined once for both sides.
(Plain strings: the core never imports Flower.)"""

# RecordDict keys
ARRAYS = "arrays"  # ArrayRecord: meta-parameters (server -> client, client -> server in "average")
GRADIENT = "meta-gradient"  # ArrayRecord: client -> server in "meta-gradient" fusion
CONFIG = "config"  # ConfigRecord: the run config (kebab-case Config mapping) + the keys below
METRICS = "metrics"  # MetricRecord

# context.state keys of a ClientApp (kept by the node across rounds of a run)
OPTIMIZER_MOMENTS = "fedmeta.optimizer.moments"  # ArrayRecord "exp_avg/<name>", "exp_avg_sq/<name>"
OPTIMIZER_STEP = "fedmeta.optimizer.step"  # MetricRecord {"step": int}

# ConfigRecord keys added by the server
SERVER_ROUND = "server-round"

# MetricRecord keys in client replies
WEIGHT = "num-examples"  # the weight a client claims for its update (number of tasks it used)
NUM_TASKS = "num-tasks"
TRAIN_LOSS = "train-loss"  # mean local query loss (after adaptation) over the round's meta-batches
LOSS_PRE = "loss-pre"  # held-out query loss before adaptation
LOSS_POST = "loss-post"  # ... after `eval-steps` adaptation steps
ACCURACY_PRE = "accuracy-pre"
ACCURACY_POST = "accuracy-post"
SECONDS = "seconds"  # client-side compute time of the handler
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
HELDOUT = "heldout"  # 1 if the partition never trains

"""Ray: Train workers (`train`), Tune sweeps (`tune`), Data reads (`data`), sharded
evaluation on actors (`evaluate`), the Jobs API (`jobs`), and what a local Ray prints
(`console`)."""

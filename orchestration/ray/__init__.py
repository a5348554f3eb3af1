"""Ray: Train workers (`train`), Tune sweeps (`tune`), Data reads (`data`), sharded
evaluation on actors (`evaluate`) and the Jobs API (`jobs`)."""

"""The networks and the contrastive objective: Loc-CondConv, the encoder, DrasCLR, queues, losses."""

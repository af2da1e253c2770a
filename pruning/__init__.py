"""Everything that prunes: prompts, channel groups, hypernetwork, score masks, baselines, extraction, FLOPs."""

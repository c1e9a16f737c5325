"""The pieces of RLModule that are not the loop itself: config checks, checkpoint state, export, rollout feed."""

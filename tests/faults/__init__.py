"""Fault suite: volunteers killed or slow, coordinator and SuperLink crashes, a volunteer's
network link lost, all with real processes."""

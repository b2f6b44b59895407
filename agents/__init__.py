"""Faust app and agents: batched inference over ``frames.*`` and dead letters."""

"""The scaling-study layer on top of the trainer."""

"""jax.distributed initialisation from flags (the multi-controller runtime)."""

import jax
from absl import logging


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None) -> None:
    """Joins the job when a coordinator is given; a single process needs nothing."""
    if not coordinator_address:
        return
    logging.info('joining %s as process %s of %s', coordinator_address, process_id, num_processes)
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)

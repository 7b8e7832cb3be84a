"""Plain-Python engine core: requests, the paged KV block manager and the scheduler. No torch here."""

"""Job specs: load, run, submit, schedule (placeholder until the lead's package lands on main)."""

"""
The job core: jobs and their states, profiles, the registry that schedules
them, the stores that keep them, and the domain's errors.  It speaks no HTTP.
"""

"""Long-running services around the trained policy (the steerable serving endpoint, shared
reward models). Nothing here yet: serving arrives with Pareto evaluation."""

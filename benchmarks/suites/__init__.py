"""The benchmark suites: their budgets, the runs they plan, and the scheduler that runs them."""
